//! The live dashboard in a real browser: headless Chromium opens the page of a running
//! `userconfig simulate --serve`, and the figures it shows must agree with `/stats` and move
//! between two looks. Skipped, loudly, only where no Chromium is installed (with `CI` set,
//! that fails instead, unless `.ci/run` could not install Debian's `chromium` and said so).
//!
//! The page's screenshot goes to the test's temporary directory, or with
//! `DASHBOARD_SCREENSHOT=docs/img/dashboard.png` (a path from the repository's root) to
//! README's picture.

mod support;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::{Server, TempDir, get};

/// The Chromium binary: `$CHROMIUM`, or the first of the usual names on `PATH`.
fn chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ]
    .iter()
    .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
    .find(|candidate| candidate.is_file())
}

fn headless(chromium: &Path, extra: &[&str], url: &str) -> std::process::Output {
    let profile = TempDir::new("chromium_profile");
    Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--no-first-run",
            "--window-size=1400,900",
            // Long enough for the page's first poll to land and render.
            "--virtual-time-budget=3000",
        ])
        .arg(format!("--user-data-dir={}", profile.0.display()))
        .args(extra)
        .arg(url)
        .output()
        .expect("chromium runs")
}

/// The page as the browser rendered it, after its script ran.
fn rendered(chromium: &Path, url: &str) -> String {
    let out = headless(chromium, &["--dump-dom"], url);
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `data-value` of the element with `id`, as the page's script set it.
fn figure(dom: &str, id: &str) -> Option<f64> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let rest = &dom[at..];
    let tag_end = rest.find('>')?;
    let tag = &rest[..tag_end];
    let value = tag.split("data-value=\"").nth(1)?.split('"').next()?;
    value.parse().ok()
}

#[test]
fn the_dashboard_shows_live_figures_that_agree_with_stats() {
    let Some(chromium) = chromium() else {
        // CI installs Chromium (.ci/services.sh); only where it could not be installed
        // (.ci/run then sets TIERCACHE_NO_BROWSER) may CI skip this test.
        assert!(
            std::env::var_os("CI").is_none() || std::env::var_os("TIERCACHE_NO_BROWSER").is_some(),
            "Chromium is not installed, and CI is set: install it (apt-get install chromium)"
        );
        let _ = writeln!(
            std::io::stderr().lock(),
            "\n!!! SKIPPED the_dashboard_shows_live_figures_that_agree_with_stats: no Chromium \
             (install Debian's `chromium`, or set CHROMIUM to a Chrome binary) !!!\n"
        );
        return;
    };
    let dir = TempDir::new("browser");
    // Enough requests to outlast the test; the process is killed at the end.
    let server = Server::start(
        &[
            "simulate",
            "--serve",
            "127.0.0.1:0",
            "--no-progress",
            "--users",
            "3000",
            "--instances",
            "2",
            "--concurrency",
            "2",
            "--requests",
            "1000000000",
        ],
        &dir.sqlite_url(),
        "dashboard: ",
        true,
    );
    let addr = server.addr.clone();
    // Wait for a few seconds of samples of the run itself (after the users are stored).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let data = get(&addr, "/dashboard/data").json();
        let samples = data["samples"].as_array().unwrap();
        let moving = samples
            .iter()
            .rev()
            .take(3)
            .filter(|s| s["requests_per_s"].as_f64().unwrap_or(0.0) > 0.0)
            .count();
        // And the consistency verifier has checked some reads (1 in 1,000, a second after).
        let checked: u64 = data["consistency"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["checked_last_hour"].as_u64().unwrap())
            .sum();
        if moving == 3 && checked > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the simulation never got going: {data}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let url = format!("http://{addr}/");

    let first = rendered(&chromium, &url);
    let stats = get(&addr, "/stats").json();
    let (hits, requests) = stats
        .as_array()
        .expect("one stats document per instance")
        .iter()
        .fold((0.0, 0.0), |(h, r), s| {
            (
                h + s["memory_cache"]["hits"].as_f64().unwrap(),
                r + s["chain"]["requests"].as_f64().unwrap(),
            )
        });
    let from_stats = hits / requests;
    let shown = figure(&first, "memory-hit-rate-total")
        .unwrap_or_else(|| panic!("no memory hit rate on the page: {first}"));
    assert!(
        (shown - from_stats).abs() < 0.02,
        "the page shows a memory hit rate of {shown}, /stats gives {from_stats}"
    );
    assert!(figure(&first, "requests-per-s").unwrap() > 0.0);
    assert!(figure(&first, "memory-entries").unwrap() > 0.0);
    assert!(figure(&first, "memory-hit-rate-minute").is_some());
    assert!(first.contains("class=\"closed\""), "breakers are listed");
    // The consistency panel: one row per instance, and the nines over the last hour.
    assert!(first.contains("id=\"consistency-panel\""), "{first}");
    let panel = &first[first.find("id=\"consistency\"").unwrap()..];
    let rows = panel[..panel.find("</tbody>").unwrap()]
        .matches("<tr>")
        .count();
    assert_eq!(rows, 1 + 2, "a header and one row per instance: {panel}");
    let nines = figure(&first, "consistency-nines").expect("the nines are shown");
    assert!(nines >= 0.0, "{nines}");
    // The charts have labelled axes: values and time.
    assert!(
        first.contains(">now</text>") && first.contains(" ms</text>"),
        "axes"
    );
    let requests_before = figure(&first, "requests-total").unwrap();
    assert!(requests_before > 0.0 && requests_before <= requests);

    std::thread::sleep(Duration::from_millis(1500));
    let second = rendered(&chromium, &url);
    let requests_after = figure(&second, "requests-total").unwrap();
    assert!(
        requests_after > requests_before,
        "the reads counter moved: {requests_before} then {requests_after}"
    );

    let target = match std::env::var_os("DASHBOARD_SCREENSHOT") {
        Some(path) => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(path),
        None => dir.0.join("dashboard.png"),
    };
    let out = headless(
        &chromium,
        &[&format!("--screenshot={}", target.display())],
        &url,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&target).expect("the screenshot was written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real picture"
    );
    drop(server);
}
