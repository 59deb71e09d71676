//! `rediss://` against a TLS-enabled local redis-server, with certificates this test makes
//! (an own CA, a server certificate for 127.0.0.1 and localhost).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tiercache_core::{CacheTier, Entry};
use tiercache_redis::RedisTier;
use tiercache_testkit::env;

struct TlsRedis {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run(dir: &Path, program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{program} must be installed for this test: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes a CA and a server certificate, and starts redis-server with TLS only.
async fn tls_redis() -> TlsRedis {
    let dir = std::env::temp_dir().join(env::unique_name("tls"));
    std::fs::create_dir_all(&dir).unwrap();
    let openssl = |args: &[&str]| run(&dir, "openssl", args);
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=tiercache test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "san.ext",
        "-out",
        "server.crt",
    ]);

    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args([
            "--tls-cert-file",
            "server.crt",
            "--tls-key-file",
            "server.key",
        ])
        .args(["--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "no"])
        .args(["--save", "", "--appendonly", "no", "--dir"])
        .arg(&dir)
        .current_dir(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server must be installed for this test");
    let mut listening = false;
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            listening = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        listening,
        "the TLS redis-server did not listen on {port} within 5 s"
    );
    TlsRedis { child, dir, port }
}

#[tokio::test]
async fn rediss_works_with_a_private_ca_and_refuses_an_untrusted_server() {
    let server = tls_redis().await;
    let ca = std::fs::read(server.dir.join("ca.crt")).unwrap();
    let trusted: RedisTier<String, String> = RedisTier::builder()
        .url(format!("rediss://localhost:{}/", server.port))
        .root_certificate(ca)
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    trusted
        .ping()
        .await
        .expect("TLS handshake with the private CA");
    trusted
        .set(&"k".into(), Entry::new(Arc::new("over tls".into()), 1))
        .await
        .unwrap();
    let got = trusted.get(&"k".into()).await.unwrap().unwrap();
    assert_eq!(got.value.as_deref().map(String::as_str), Some("over tls"));

    // The system's trust store does not know this CA: the handshake must fail.
    let untrusted: RedisTier<String, String> = RedisTier::builder()
        .url(format!("rediss://localhost:{}/", server.port))
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    assert!(untrusted.ping().await.is_err(), "an unknown CA is refused");

    // Plain text to a TLS port gets nowhere either.
    let plain: RedisTier<String, String> = RedisTier::builder()
        .url(format!("redis://127.0.0.1:{}/", server.port))
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    assert!(plain.ping().await.is_err());
}
