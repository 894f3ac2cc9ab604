//! The operator dashboard in a real headless Chromium (Debian `chromium`), after real
//! activations: what a person sees (counts per application against the threshold, members
//! and leader, recent activations, the clients table and its search, the token prompt).
//! A screenshot is saved under the target directory and its path printed.
//!
//! Without chromium the test is skipped locally and fails in CI (CI=true).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kms_tests::{bin_dir, Node};
use kms_wire::client::BindOptions;
use kmsctl::client::{Answer, KmsClient};
use kmsctl::products::{resolve, RequestTemplate};
use uuid::Uuid;

const TOKEN: &str = "e2e-dashboard-token-0123";

fn chromium() -> Option<PathBuf> {
    let found = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var("CI").map(|v| v != "true").unwrap_or(true),
            "chromium is missing in CI: run tests/ops/install.sh"
        );
        eprintln!("SKIPPED: chromium not installed (bash tests/ops/install.sh)");
    }
    found
}

fn browser(chromium: &Path, profile: &Path) -> Command {
    let mut cmd = Command::new(chromium);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        // Lets the page's fetches and rendering finish before the DOM is dumped.
        "--virtual-time-budget=8000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    cmd
}

/// The page's DOM after its scripts ran (retried: a cold browser start can be slow).
fn dump_dom(chromium: &Path, profile: &Path, url: &str) -> String {
    let mut last = String::new();
    for _ in 0..3 {
        let out = browser(chromium, profile)
            .arg("--dump-dom")
            .arg(url)
            .output()
            .expect("run chromium");
        last = String::from_utf8_lossy(&out.stdout).into_owned();
        if last.contains("data-loaded=\"1\"") || last.contains("id=\"token-form\">") {
            return last;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("the dashboard did not load:\n{last}");
}

/// The `<tr ...>...</tr>` whose opening tag contains `marker`.
fn row<'a>(dom: &'a str, marker: &str) -> &'a str {
    let start = dom
        .find(&format!("<tr {marker}"))
        .unwrap_or_else(|| panic!("no row {marker} in\n{dom}"));
    let rest = &dom[start..];
    &rest[..rest.find("</tr>").map_or(rest.len(), |e| e + 5)]
}

/// The `<tbody>` of the table with `id`.
fn tbody<'a>(dom: &'a str, id: &str) -> &'a str {
    let table = &dom[dom
        .find(&format!("<table id=\"{id}\""))
        .unwrap_or_else(|| panic!("no table {id}"))..];
    let body = &table[table.find("<tbody>").unwrap_or(0)..];
    &body[..body.find("</tbody>").unwrap_or(body.len())]
}

async fn activate(node: &Node, product: &str, n: usize, workstation: &str) {
    let mut t = RequestTemplate::new(resolve(product).unwrap());
    t.workstation = workstation.to_owned();
    let mut c = KmsClient::connect(&node.kms(), BindOptions::default(), Duration::from_secs(10))
        .await
        .unwrap();
    for _ in 0..n {
        match c
            .activate(
                &t.build(Uuid::new_v4(), kms_tests::now_ms()),
                rand::random(),
            )
            .await
            .unwrap()
        {
            Answer::Activated(_) => {}
            Answer::Refused(hr) => panic!("refused 0x{hr:08X}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_counts_members_activations_and_searchable_clients() {
    let Some(chromium) = chromium() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("node")).unwrap();
    let node = Node::start(&dir.path().join("node"), &["--admin-token", TOKEN]);
    // 3 Windows clients (N = 25), 5 Office clients (N = 5, so Office activates), 1 server.
    activate(&node, "windows", 3, "ws-alpha").await;
    activate(&node, "office", 5, "ws-beta").await;
    activate(&node, "server", 1, "ws-gamma").await;
    let base = format!("http://{}/", node.admin_addr);

    // Without a token the page asks for one and shows no data.
    let dom = dump_dom(&chromium, &dir.path().join("profile-a"), &base);
    assert!(
        dom.contains("<form id=\"token-form\">"),
        "token form shown:\n{dom}"
    );
    assert!(dom.contains("<main id=\"main\" hidden=\"\">"), "{dom}");

    // With the token (and a search for "beta").
    let url = format!("{base}#token={TOKEN}&search=beta");
    let dom = dump_dom(&chromium, &dir.path().join("profile-b"), &url);
    assert!(dom.contains("data-loaded=\"1\""), "{dom}");
    assert!(
        dom.contains("<strong id=\"node-role\">leader</strong>"),
        "{dom}"
    );
    assert!(
        dom.contains("<strong id=\"node-leader\">1</strong>"),
        "{dom}"
    );
    assert!(
        dom.contains("<span id=\"node-ready\" class=\"badge ok\">ready</span>"),
        "{dom}"
    );
    assert!(
        dom.contains("<div class=\"value\" id=\"total-requests\">9</div>"),
        "{dom}"
    );
    assert!(
        dom.contains("<div class=\"value\" id=\"failed-requests\">0</div>"),
        "{dom}"
    );

    // Counts against the threshold.
    let windows = row(&dom, "data-app=\"Windows\"");
    assert!(windows.contains("data-met=\"false\""), "{windows}");
    assert!(windows.contains("<td class=\"count\">4</td>"), "{windows}");
    assert!(
        windows.contains("<td class=\"threshold\">25</td>"),
        "{windows}"
    );
    assert!(windows.contains("below threshold"), "{windows}");
    let office = row(&dom, "data-app=\"Office 2013");
    assert!(office.contains("data-met=\"true\""), "{office}");
    assert!(office.contains("<td class=\"count\">5</td>"), "{office}");
    assert!(
        office.contains("<td class=\"threshold\">5</td>"),
        "{office}"
    );
    assert!(office.contains("activating"), "{office}");

    // Members and leader.
    let member = row(&dom, "data-member=\"1\"");
    assert!(member.contains("data-leader=\"true\""), "{member}");
    assert!(member.contains(&node.admin_addr.to_string()), "{member}");

    // Recent activations: all nine, newest (the server) first.
    let activations = tbody(&dom, "activations");
    assert_eq!(
        activations.matches("<tr data-seq=").count(),
        9,
        "{activations}"
    );
    let first = row(activations, "data-seq=");
    assert!(first.contains("ws-gamma"), "{first}");
    for ws in ["ws-alpha", "ws-beta"] {
        assert!(activations.contains(ws), "{ws} in {activations}");
    }

    // The clients table honours the search: only the five Office clients.
    let clients = tbody(&dom, "clients");
    assert_eq!(clients.matches("<tr data-cmid=").count(), 5, "{clients}");
    assert_eq!(clients.matches("<td>ws-beta</td>").count(), 5, "{clients}");
    assert!(
        !clients.contains("ws-alpha") && !clients.contains("ws-gamma"),
        "{clients}"
    );
    assert!(
        dom.contains("<span class=\"muted\" id=\"clients-total\">(5 matching)</span>"),
        "{dom}"
    );

    // Screenshot of the whole page (no search) for a person to look at.
    let shots = bin_dir().join("screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let png = shots.join("dashboard.png");
    let _ = std::fs::remove_file(&png);
    let status = browser(&chromium, &dir.path().join("profile-c"))
        .arg("--window-size=1280,1700")
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("{base}#token={TOKEN}"))
        .output()
        .expect("run chromium")
        .status;
    assert!(status.success(), "screenshot failed: {status}");
    let bytes = std::fs::read(&png).expect("screenshot written");
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(
        bytes.len() > 20_000,
        "screenshot suspiciously small: {} bytes",
        bytes.len()
    );
    println!("dashboard screenshot: {}", png.display());
}
