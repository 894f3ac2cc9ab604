//! The command-line contracts: kmsctl output and exit codes, kmsd flags, help and errors.

use std::process::Command;

use kms_tests::{binary, free_port, Node};

fn kmsctl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary("kmsctl")).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn kmsctl_activate_json_exit_codes_and_bench() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &[]);
    let server = node.kms();

    let (code, out, err) = kmsctl(&[
        "activate",
        "--server",
        &server,
        "--product",
        "windows",
        "--count",
        "3",
        "--json",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for (i, v) in lines.iter().enumerate() {
        assert_eq!(v["result"], "success");
        assert_eq!(v["current_count"], i as u64 + 1);
        assert_eq!(v["required_count"], 25);
        assert_eq!(v["activated"], false);
        assert_eq!(v["protocol"], "6.0");
        assert_eq!(v["hwid"].as_str().map(str::len), Some(16));
    }

    // Text output, v4, NDR32-only bind, no multiplex, one connection per request.
    let (code, out, err) = kmsctl(&[
        "activate",
        "--server",
        &server,
        "--product",
        "office2010",
        "--protocol",
        "4",
        "--bind",
        "ndr32",
        "--no-multiplex",
        "--new-connection",
        "--count",
        "2",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("KMS host ePID"), "{out}");
    assert!(out.contains("Current count         : 2"), "{out}");
    assert!(!err.contains("Warning"), "{err}");

    // A refused request (unsupported version) exits 1 and names the HRESULT.
    let (code, out, _) = kmsctl(&["activate", "--server", &server, "--raw-version", "7.0"]);
    assert_eq!(code, 1);
    assert!(out.contains("0x8007000D"), "{out}");

    // Usage errors exit 2 and name the problem.
    let (code, _, err) = kmsctl(&[
        "activate",
        "--server",
        &server,
        "--product",
        "no such thing",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("--product"), "{err}");

    // Unreachable host exits 3.
    let dead = format!("127.0.0.1:{}", free_port());
    let (code, _, err) = kmsctl(&["activate", "--server", &dead, "--timeout-secs", "2"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("cannot connect"), "{err}");

    // A short bench run: bounded, all verified, JSON report.
    let (code, out, err) = kmsctl(&[
        "bench",
        "--server",
        &server,
        "--concurrency",
        "4",
        "--requests",
        "200",
        "--duration-secs",
        "30",
        "--json",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["requests"], 200);
    assert_eq!(report["succeeded"], 200);
    assert_eq!(report["failed"], 0);
    assert!(report["latency_ms"]["p99"].as_f64().unwrap() > 0.0);
}

#[test]
fn kmsd_help_documents_every_flag_and_its_environment_variable() {
    let out = Command::new(binary("kmsd")).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for (flag, env) in [
        ("--config", "KMSD_CONFIG"),
        ("--kms-listen", "KMSD_KMS_LISTEN"),
        ("--data-dir", "KMSD_DATA_DIR"),
        ("--node-id", "KMSD_NODE_ID"),
        ("--admin-listen", "KMSD_ADMIN_LISTEN"),
        ("--raft-listen", "KMSD_RAFT_LISTEN"),
        ("--join", "KMSD_JOIN"),
        ("--raft-heartbeat-ms", "KMSD_RAFT_HEARTBEAT_MS"),
        (
            "--raft-election-timeout-min-ms",
            "KMSD_RAFT_ELECTION_TIMEOUT_MIN_MS",
        ),
        (
            "--raft-election-timeout-max-ms",
            "KMSD_RAFT_ELECTION_TIMEOUT_MAX_MS",
        ),
        ("--max-connections", "KMSD_MAX_CONNECTIONS"),
        ("--idle-timeout-secs", "KMSD_IDLE_TIMEOUT_SECS"),
        ("--max-pdu-size", "KMSD_MAX_PDU_SIZE"),
        ("--max-pdus-per-connection", "KMSD_MAX_PDUS_PER_CONNECTION"),
        ("--allow-network", "KMSD_ALLOW_NETWORKS"),
        ("--renewal-interval", "KMSD_RENEWAL_INTERVAL"),
        ("--activation-interval", "KMSD_ACTIVATION_INTERVAL"),
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
        assert!(help.contains(env), "--help lacks {env}");
    }
}

#[test]
fn kmsd_rejects_bad_configuration_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("kmsd.toml");
    std::fs::write(&cfg, "[kms]\nidle_timeout_secs = 0\n").unwrap();
    let out = Command::new(binary("kmsd"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("kms.idle_timeout_secs"), "{err}");

    std::fs::write(&cfg, "[kms]\nlisten_on = 1\n").unwrap();
    let out = Command::new(binary("kmsd"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen_on"));

    let out = Command::new(binary("kmsd"))
        .env("KMSD_RENEWAL_INTERVAL", "1")
        .arg("--data-dir")
        .arg(dir.path().join("d"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("policy.renewal_interval"));
}

/// Every node flag is accepted after a subcommand too (`kmsd check-config --allow-network …`),
/// and check-config shows what it understood.
#[test]
fn node_flags_are_accepted_after_a_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d").display().to_string();
    // `kmsd check-config ARGS` with no KMSD_* environment; returns stdout, exit code 0 required.
    let check_config = |args: &[&str]| -> String {
        let mut cmd = Command::new(binary("kmsd"));
        for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("KMSD_")) {
            cmd.env_remove(key);
        }
        let out = cmd
            .arg("check-config")
            .args(["--data-dir", &data])
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {text}{err}");
        text
    };

    let text = check_config(&[
        "--kms-listen",
        "127.0.0.1:11688,[::1]:11688",
        "--allow-network",
        "10.0.0.0/8",
        "--allow-network",
        "192.168.1.0/24",
        "--admin-token",
        "a-long-enough-admin-token-0123",
        "--raft-heartbeat-ms",
        "250",
        "--raft-election-timeout-min-ms",
        "1000",
        "--raft-election-timeout-max-ms",
        "3000",
    ]);
    for expected in [
        "kms [127.0.0.1:11688, [::1]:11688]",
        "clients [10.0.0.0/8, 192.168.1.0/24]",
        "(token set)",
        "(heartbeat 250 ms, election timeout 1000-3000 ms)",
    ] {
        assert!(text.contains(expected), "lacks {expected:?}: {text}");
    }

    let text = check_config(&[]);
    for expected in [
        "clients all",
        "(token none)",
        "(heartbeat 100 ms, election timeout 400-800 ms)",
    ] {
        assert!(text.contains(expected), "lacks {expected:?}: {text}");
    }
}

#[test]
fn config_file_and_allow_list_are_honoured() {
    let dir = tempfile::tempdir().unwrap();
    // Only 10.0.0.0/8 may connect: loopback clients are closed without an answer.
    let node = Node::start(dir.path(), &["--allow-network", "10.0.0.0/8"]);
    let (code, _, err) = kmsctl(&["activate", "--server", &node.kms(), "--timeout-secs", "3"]);
    assert_ne!(code, 0, "{err}");

    let dir2 = tempfile::tempdir().unwrap();
    let cfg = dir2.path().join("kmsd.toml");
    std::fs::write(
        &cfg,
        "[policy]\nrenewal_interval = 1440\nactivation_interval = 60\n[kms]\nallow_networks = [\"127.0.0.0/8\"]\n",
    )
    .unwrap();
    let node = Node::start(dir2.path(), &["--config", cfg.to_str().unwrap()]);
    let (code, out, err) = kmsctl(&["activate", "--server", &node.kms(), "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["renewal_interval"], 1440);
    assert_eq!(v["activation_interval"], 60);
}

/// The harness itself: when another process holds a port chosen for a node, the node starts
/// on a new port instead of failing the test (the cause of a spurious CI failure).
#[test]
fn harness_moves_a_node_off_a_port_taken_by_another_process() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Occupy the KMS port chosen for a node (another node config if that port cannot be held).
    let (mut node, squatter) = (0..5)
        .find_map(|_| {
            let node = Node::new(dir.path(), &[]);
            let squatter = std::net::TcpListener::bind(node.kms_addr).ok()?;
            Some((node, squatter))
        })
        .expect("a port to squat on");
    let taken = node.kms_addr;
    node.spawn();
    assert_ne!(node.kms_addr, taken, "the node kept the taken port");
    assert!(
        node.log().contains("Address already in use"),
        "the first start should have failed on the taken port:\n{}",
        node.log()
    );
    // The node serves on its new port while the old one is still held by the squatter.
    assert!(std::net::TcpStream::connect(node.kms_addr).is_ok());
    drop(squatter);
    assert_eq!(node.terminate(), Some(0));
}
