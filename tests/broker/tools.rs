//! The command-line tools as a user runs them: the `petrel` binary's `pub`, `sub` and
//! `bench` against an in-process broker, over QUIC and TCP. Every child process is bounded by
//! a timeout and killed when the test ends.

use std::process::Stdio;
use std::time::Duration;

use petrel::config::ListenerKind;
use tokio::process::Command;

use crate::common::unique;
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
