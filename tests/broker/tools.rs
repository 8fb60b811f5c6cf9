//! The command-line tools as a user runs them: the `petrel` binary's `pub`, `sub` and
//! `bench` against an in-process broker, over QUIC and TCP, and `petrel ctl` against its HTTP
//! API (and against a `petrel` process for `reload`). Every child process is bounded by a
//! timeout and killed when the test ends.

use std::process::Stdio;
use std::time::Duration;

use petrel::config::ListenerKind;
use tokio::process::Command;

use crate::common::{temp_data_dir, unique, TempDir, TestBroker, TEST_ADMIN_PASSWORD, V4};
use crate::transports::TransportBroker;

fn petrel() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_petrel"));
    command.kill_on_drop(true).stdin(Stdio::null());
    command
}

#[tokio::test]
async fn tools_pub_and_sub_over_quic_like_mosquitto() {
    let broker = TransportBroker::start().await;
    let url = format!(
        "quic://127.0.0.1:{}",
        broker.addr(ListenerKind::Quic).port()
    );
    let ca = broker.ca_path();
    let topic = unique("cli/quic");
    let sub = petrel()
        .args(["sub", "-u", &url, "--cafile"])
        .arg(&ca)
        .args(["-t", &format!("{topic}/+"), "-q", "1", "-v", "-C", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let waiting = tokio::spawn(sub.wait_with_output());
    // The subscriber gives no sign of having subscribed: publish until it has had two.
    for _ in 0..40 {
        if waiting.is_finished() {
            break;
        }
        let status = petrel()
            .args(["pub", "-u", &url, "--cafile"])
            .arg(&ca)
            .args([
                "-t",
                &format!("{topic}/1"),
                "-m",
                "hello",
                "-q",
                "1",
                "--user-property",
                "k=v",
            ])
            .status()
            .await
            .unwrap();
        assert!(status.success(), "petrel pub failed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let output = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("petrel sub exits after -C 2")
        .unwrap()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines, vec![format!("{topic}/1 hello"); 2]);
    broker.shutdown().await;
}

#[tokio::test]
async fn tools_bench_json_report_is_complete_and_parses() {
    let broker = TransportBroker::start().await;
    let url = format!("mqtt://127.0.0.1:{}", broker.addr(ListenerKind::Tcp).port());
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        petrel()
            .args([
                "bench",
                "-u",
                &url,
                "--scenario",
                "p2p",
                "--pubs",
                "2",
                "-q",
                "1",
            ])
            .args(["--size", "128", "--duration", "1", "--json", "--quiet"])
            .output(),
    )
    .await
    .expect("the bench ends")
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("one JSON object");
    let n = |key: &str| {
        report[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key} in {report}"))
    };
    assert_eq!(report["scenario"], "p2p");
    assert!(n("sent") > 0);
    assert_eq!(n("expected"), n("sent"), "p2p: one delivery per message");
    assert_eq!(n("delivered"), n("sent"), "QoS 1 loses nothing");
    assert_eq!((n("lost"), n("duplicates")), (0, 0));
    assert_eq!(n("size"), 128);
    let latency = &report["latency"];
    assert!(latency["p99_us"].as_u64().unwrap() >= latency["p50_us"].as_u64().unwrap());
    assert!(report["bench_cpu_percent"].as_f64().is_some());
    broker.shutdown().await;
}

/// What a finished `petrel ctl` said: exit code, standard output and standard error.
#[derive(Debug)]
struct Ctl {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `petrel ctl --url URL ARGS` (bounded), with no `PETREL_API_*` from our environment.
async fn ctl(url: &str, args: &[&str]) -> Ctl {
    let mut command = petrel();
    command.args(["ctl", "--url", url]).args(args);
    for var in [
        "PETREL_API_URL",
        "PETREL_API_KEY",
        "PETREL_API_USER",
        "PETREL_API_PASSWORD",
    ] {
        command.env_remove(var);
    }
    let output = tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .expect("petrel ctl ends")
        .unwrap();
    Ctl {
        code: output.status.code().expect("petrel ctl exits, not killed"),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
    }
}

/// `petrel ctl` as the test broker's administrator.
async fn admin(url: &str, args: &[&str]) -> Ctl {
    let mut all = vec!["--user", "admin", "--password", TEST_ADMIN_PASSWORD];
    all.extend_from_slice(args);
    ctl(url, &all).await
}

fn api_url(broker: &TestBroker) -> String {
    format!(
        "http://{}",
        broker.running.api_addr().expect("the API runs")
    )
}

/// A local port with nothing listening on it (bound, then released).
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn tools_ctl_lists_shows_and_kicks_a_client() {
    let broker = TestBroker::start().await;
    let url = api_url(&broker);
    let status = ctl(&url, &["status"]).await;
    assert_eq!(status.code, 0, "{status:?}");
    assert!(status.stdout.contains("is running"), "{status:?}");

    let id = unique("ctl-client");
    let mut client = V4::connect(broker.addr, &id).await;
    client.subscribe("ctl/t/+", rumqttc::QoS::AtLeastOnce).await;

    let stats = admin(&url, &["stats"]).await;
    assert_eq!(stats.code, 0, "{stats:?}");
    assert!(
        stats.stdout.contains("subscriptions.count: 1\n"),
        "{stats:?}"
    );

    let list = admin(&url, &["clients", "list"]).await;
    assert_eq!(list.code, 0, "{list:?}");
    let row = list
        .stdout
        .lines()
        .find(|l| l.starts_with(&format!("{id} ")))
        .unwrap_or_else(|| panic!("{id} not listed: {list:?}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[1], "-", "no username: {row}");
    assert!(cells[2].starts_with("127.0.0.1:"), "{row}");
    assert_eq!(&cells[3..], ["tcp", "4", "connected", "1", "0"], "{row}");
    let json = admin(&url, &["clients", "list", "--like", &id, "--json"]).await;
    let body: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(body["data"][0]["clientid"], id.as_str(), "{body}");
    assert_eq!(body["meta"]["count"], 1);
    // Paging: every page unless --page picks one.
    let other = V4::connect(broker.addr, &unique("ctl-other")).await;
    let all = admin(&url, &["clients", "list", "--limit", "1", "--json"]).await;
    let all: serde_json::Value = serde_json::from_str(&all.stdout).unwrap();
    assert_eq!(all["data"].as_array().map(Vec::len), Some(2), "{all}");
    let page = admin(&url, &["clients", "list", "--limit", "1", "--page", "2"]).await;
    assert_eq!(
        page.stdout.lines().count(),
        2,
        "a header and one row: {page:?}"
    );
    other.disconnect().await;

    let show = admin(&url, &["clients", "show", &id]).await;
    assert_eq!(show.code, 0, "{show:?}");
    assert!(
        show.stdout.contains(&format!("clientid: {id}\n")),
        "{show:?}"
    );
    assert!(show.stdout.contains("  ctl/t/+  1"), "{show:?}");
    let subscriptions = admin(&url, &["subscriptions", "--clientid", &id]).await;
    assert!(
        subscriptions.stdout.contains(&format!("{id}  ctl/t/+")),
        "{subscriptions:?}"
    );

    let kick = admin(&url, &["clients", "kick", &id]).await;
    assert_eq!(kick.code, 0, "{kick:?}");
    client.expect_connection_error().await;
    // The clean session goes away with its connection; wait (bounded) for the API to agree.
    let mut gone = None;
    for _ in 0..50 {
        let show = admin(&url, &["clients", "show", &id]).await;
        if show.code != 0 {
            gone = Some(show);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gone = gone.expect("the kicked client is still shown");
    assert_eq!(gone.code, 1, "{gone:?}");
    assert!(
        gone.stderr.starts_with("error: CLIENTID_NOT_FOUND: "),
        "{gone:?}"
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn tools_ctl_exit_codes_tell_refused_from_unreachable() {
    let broker = TestBroker::start().await;
    let url = api_url(&broker);
    let wrong = ctl(
        &url,
        &[
            "--user",
            "admin",
            "--password",
            "not-the-password",
            "clients",
            "list",
        ],
    )
    .await;
    assert_eq!(wrong.code, 1, "{wrong:?}");
    assert!(
        wrong.stderr.starts_with("error: BAD_API_KEY_OR_SECRET: "),
        "{wrong:?}"
    );
    assert!(!format!("{}{}", wrong.stdout, wrong.stderr).contains("not-the-password"));
    let anonymous = ctl(&url, &["stats"]).await;
    assert_eq!(anonymous.code, 1, "{anonymous:?}");
    let usage = ctl(&url, &["--user", "admin", "stats"]).await;
    assert_eq!(usage.code, 2, "{usage:?}");
    let usage = ctl(&url, &["clients", "frobnicate"]).await;
    assert_eq!(usage.code, 2, "{usage:?}");
    broker.shutdown().await;

    let nothing = format!("http://127.0.0.1:{}", closed_port());
    let unreachable = admin(&nothing, &["status"]).await;
    assert_eq!(unreachable.code, 3, "{unreachable:?}");
    assert!(
        unreachable
            .stderr
            .starts_with("error: cannot reach the API"),
        "{unreachable:?}"
    );
    assert!(!unreachable.stderr.contains(TEST_ADMIN_PASSWORD));
}

#[tokio::test]
async fn tools_ctl_banned_add_list_remove() {
    let broker = TestBroker::start().await;
    let url = api_url(&broker);
    let who = unique("ctl-banned");
    let add = admin(
        &url,
        &[
            "banned", "add", "--as", "clientid", &who, "--reason", "testing", "--until", "1h",
        ],
    )
    .await;
    assert_eq!(add.code, 0, "{add:?}");
    let list = admin(&url, &["banned", "list"]).await;
    let row = list
        .stdout
        .lines()
        .find(|l| l.starts_with(&format!("clientid  {who}  testing  admin")))
        .unwrap_or_else(|| panic!("the ban is not listed: {list:?}"));
    assert!(!row.ends_with("infinity"), "--until 1h: {row}");
    let remove = admin(&url, &["banned", "remove", "--as", "clientid", &who]).await;
    assert_eq!(remove.code, 0, "{remove:?}");
    let list = admin(&url, &["banned", "list", "--json"]).await;
    let body: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    assert_eq!(body["data"], serde_json::json!([]), "{body}");
    let again = admin(&url, &["banned", "remove", "--as", "clientid", &who]).await;
    assert_eq!(again.code, 1, "{again:?}");
    broker.shutdown().await;
}

#[tokio::test]
async fn tools_ctl_retained_list_show_delete() {
    let broker = TestBroker::start().await;
    let url = api_url(&broker);
    // A space and a `?` in the topic: the name travels as one percent-encoded path segment.
    let topic = format!("{}/x y?", unique("ctl/ret"));
    let mut client = V4::connect(broker.addr, &unique("ctl-retainer")).await;
    client
        .publish(&topic, rumqttc::QoS::AtLeastOnce, true, b"kept")
        .await;
    let list = admin(&url, &["retained", "list", "--topic", "ctl/#"]).await;
    assert!(list.stdout.contains(&format!("\n{topic}  1")), "{list:?}");
    let show = admin(&url, &["retained", "show", &topic]).await;
    assert_eq!(show.code, 0, "{show:?}");
    assert!(show.stdout.contains("payload: kept\n"), "{show:?}");
    let delete = admin(&url, &["retained", "delete", &topic]).await;
    assert_eq!(delete.code, 0, "{delete:?}");
    let show = admin(&url, &["retained", "show", &topic]).await;
    assert_eq!(show.code, 1, "{show:?}");
    assert!(show.stderr.starts_with("error: NOT_FOUND: "), "{show:?}");
    let list = admin(&url, &["retained", "list", "--topic", "ctl/#"]).await;
    assert_eq!((list.code, list.stdout.as_str()), (0, ""), "{list:?}");
    client.disconnect().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn tools_ctl_reload_needs_a_process_that_serves_reloads() {
    // An in-process broker whose program does not serve reloads (never takes their
    // receiver): the API says so at once.
    let broker = TestBroker::start().await;
    let refused = admin(&api_url(&broker), &["reload"]).await;
    assert_eq!(refused.code, 1, "{refused:?}");
    assert_eq!(
        refused.stderr,
        "error: SERVICE_UNAVAILABLE: this process does not serve reloads\n"
    );
    broker.shutdown().await;

    let data = TempDir(temp_data_dir("ctl-reload"));
    let api = format!("127.0.0.1:{}", closed_port());
    let mut process = petrel()
        .args(["--tcp", &format!("127.0.0.1:{}", closed_port())])
        .args(["--set", &format!("api.bind={api}")])
        .args(["--set", "api.default_password=pw", "--data-dir"])
        .arg(&data.0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://{api}");
    let mut up = false;
    for _ in 0..100 {
        if ctl(&url, &["status"]).await.code == 0 {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "the broker's API did not come up");
    let reload = ctl(&url, &["--password", "pw", "reload"]).await;
    assert_eq!(reload.code, 0, "{reload:?}");
    assert!(reload.stdout.starts_with("reloaded"), "{reload:?}");
    let _ = process.kill().await;
}

#[tokio::test]
async fn tools_ctl_trusts_a_private_ca_for_an_https_api() {
    let certs = TempDir(temp_data_dir("ctl-certs"));
    petrel::transport::certs::write_bundle(&certs.0, "client").unwrap();
    let broker = TestBroker::start_with(|config| {
        config.api.cert = Some(certs.0.join("server.pem"));
        config.api.key = Some(certs.0.join("server.key"));
    })
    .await;
    let url = format!("https://{}", broker.running.api_addr().unwrap());
    let ca = certs.0.join("ca.pem");
    let ca = ca.to_str().unwrap();
    let trusted = admin(&url, &["--cafile", ca, "clients", "list"]).await;
    assert_eq!(trusted.code, 0, "{trusted:?}");
    // Without it, the public roots do not know the development CA: a TLS failure.
    let untrusted = admin(&url, &["status"]).await;
    assert_eq!(untrusted.code, 3, "{untrusted:?}");
    let unreadable = admin(&url, &["--cafile", "/nonexistent/ca.pem", "status"]).await;
    assert_eq!(unreadable.code, 2, "{unreadable:?}");
    broker.shutdown().await;
}
