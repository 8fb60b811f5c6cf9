//! Packet mode end to end: a namespace behind an impaired TUN link, a TCP echo across it, and
//! nothing left behind. Runs only as root with /dev/net/tun; otherwise it prints why and passes.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use netem::spec::{Direction, Profiles, Stages};
use netem::units::Time;
use netem::{packet, PacketLink, Profile};

fn skip_reason() -> Option<String> {
    packet::available().err().map(|e| e.to_string())
}

fn namespaces() -> String {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A TCP echo server on `addr` that serves one connection, on its own thread.
fn echo_once(listener: TcpListener) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => stream.write_all(&buf[..n]).unwrap(),
            }
        }
    })
}

#[test]
fn tcp_crosses_the_impaired_link_and_cleanup_leaves_nothing() {
    if let Some(reason) = skip_reason() {
        eprintln!("skipping packet-mode test: {reason}");
        return;
    }
    // The reference condition: 25 ms and 5 % loss on the host's egress (down), clean up.
    let profile = Profiles::builtin().find("lossy-5").unwrap().clone();
    let seed = netem::seed::from_env_or_random();
    let link = PacketLink::start_profile("ntest", &profile, seed).unwrap();
    let namespace = link.namespace().to_owned();
    let host_dev = link.host_device().to_owned();
    assert!(namespaces().contains(&namespace));
    assert!(Path::new("/sys/class/net").join(&host_dev).exists());

    let listener = TcpListener::bind((link.host_addr(), 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    let server = echo_once(listener);
    let output = link
        .command(env!("CARGO_BIN_EXE_netem"))
        .args([
            "probe",
            &addr.to_string(),
            "--count",
            "40",
            "--timeout",
            "30s",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "probe failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("40/40 echoed"), "{stdout}");
    // Every round trip crosses the 25 ms down direction at least once.
    let min: f64 = stdout
        .split("rtt min ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    assert!(min >= 25.0, "min rtt {min} ms below the configured delay");
    server.join().unwrap();
    let stats = link.stats();
    assert!(stats.down.sent >= 40 && stats.up.sent >= 40, "{stats:?}");
    assert_eq!(stats.up.lost, 0);

    link.shutdown().unwrap();
    assert!(!namespaces().contains(&namespace), "namespace left behind");
    assert!(
        !Path::new("/sys/class/net").join(&host_dev).exists(),
        "device left behind"
    );
}

#[test]
fn drop_cleans_up_and_the_namespace_cannot_reach_past_the_host_end() {
    if let Some(reason) = skip_reason() {
        eprintln!("skipping packet-mode test: {reason}");
        return;
    }
    let profile = Profile {
        down: Stages {
            delay: Time(Duration::from_millis(5)),
            ..Stages::default()
        },
        ..Profile::clean()
    };
    let namespace;
    {
        let link = PacketLink::start(
            "ntdrop",
            profile.link(Direction::Up),
            profile.link(Direction::Down),
            1,
        )
        .unwrap();
        namespace = link.namespace().to_owned();
        let routes = link.command("ip").args(["route"]).output().unwrap();
        let routes = String::from_utf8_lossy(&routes.stdout);
        assert!(
            !routes.contains("default"),
            "the namespace has a default route: {routes}"
        );
    }
    assert!(!namespaces().contains(&namespace), "drop left {namespace}");
}

#[test]
fn cleanup_removes_leftover_namespaces_by_prefix() {
    if let Some(reason) = skip_reason() {
        eprintln!("skipping packet-mode test: {reason}");
        return;
    }
    let status = Command::new("ip")
        .args(["netns", "add", "ntleft-250"])
        .status()
        .unwrap();
    assert!(status.success());
    let removed = packet::cleanup("ntleft").unwrap();
    assert_eq!(removed, vec!["namespace ntleft-250".to_owned()]);
    assert!(!namespaces().contains("ntleft-250"));
}
