//! The OpenAPI contract, fuzzed by a client nobody here wrote: schemathesis (PyPI) reads
//! `/openapi.json` from a live `userconfig serve` (with a service token of every scope) and
//! sends what the document allows and what it forbids, checking every response against it:
//! statuses, headers, bodies, content types, that valid data is taken and invalid refused, that
//! a route without the token is refused, and sequences of calls (stateful). Skipped, loudly,
//! only where schemathesis is not installed (with `CI` set, that fails instead: `.ci/services.sh`
//! installs it).

mod support;

use std::process::Command;

use support::{Server, TempDir, get, token};

/// Checks left out, each with its reason.
///
/// `use_after_free`: after a `DELETE`, a `GET` of the same user answers the defaults (200,
/// `X-Config-Stored: false`, `ETag: "0"`), by design: every user has a configuration, stored
/// or not, so a deleted one reads as a new user's rather than 404.
const EXCLUDED: &str = "use_after_free";

/// Routes left out, each with its reason.
///
/// The event streams never end by design (changes, until the client leaves), and schemathesis
/// reads a response to its end; `tests/events.rs` tests them.
const EXCLUDED_PATHS: [&str; 2] = ["/v1/users/{id}/config/events", "/v1/changes"];

#[test]
fn schemathesis_finds_nothing_against_a_live_service() {
    if Command::new("schemathesis")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "schemathesis is not installed, and CI is set: pip install schemathesis"
        );
        eprintln!("!!! SKIPPED: schemathesis is not installed (pip install schemathesis)");
        return;
    }
    let dir = TempDir::new("openapi_fuzz");
    let (token, line) = token("fuzz", "read,write,admin");
    let server = Server::with_tokens(&dir, &[&line], &[]);
    // The document is open, and the one kept in the repository.
    let served = get(&server.addr, "/openapi.json");
    assert_eq!(served.status, 200);
    let kept = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/openapi.json"
    ))
    .unwrap();
    assert_eq!(served.text(), kept);

    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/schemathesis.toml");
    let run = Command::new("schemathesis")
        .args(["--config-file", config, "run"])
        .arg(format!("http://{}/openapi.json", server.addr))
        .args(["--checks", "all", "--exclude-checks", EXCLUDED])
        .args(EXCLUDED_PATHS.iter().flat_map(|p| ["--exclude-path", p]))
        .args(["--request-timeout", "20"])
        .args(["--max-examples", "25", "--seed", "1"])
        .args(["--header", &format!("Authorization: Bearer {token}")])
        .env("NO_COLOR", "1")
        // Its cache (`.schemathesis/`) goes with the rest of the test's files.
        .current_dir(&dir.0)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "schemathesis found failures:\n{said}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(said.contains("No issues found"), "{said}");
}
