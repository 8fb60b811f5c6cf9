//! What the cluster's tests run against: real `nats-server -js` processes on free loopback
//! ports with their stores in temporary directories, killed (and the directories removed)
//! when dropped. A missing `nats-server` fails the test with what to install.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A `nats-server -js` of this test's own; killed and its directory removed on drop.
pub(crate) struct Server {
    child: Child,
    dir: PathBuf,
    pub(crate) port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn nats_server() -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let path = PathBuf::from(dir).join("nats-server");
        if path.is_file() {
            return path;
        }
    }
    for path in ["/usr/sbin/nats-server", "/usr/bin/nats-server"] {
        if std::path::Path::new(path).is_file() {
            return path.into();
        }
    }
    panic!(
        "nats-server not found: the cluster store tests need it (`apt-get install nats-server` \
         or https://github.com/nats-io/nats-server/releases; CI installs it)"
    );
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl Server {
    pub(crate) async fn start(name: &str) -> Self {
        Self::spawn(name, free_port(), &[]).await
    }

    /// A server on `port` with `extra` arguments, up (accepting connections).
    pub(crate) async fn spawn(name: &str, port: u16, extra: &[String]) -> Self {
        let dir = std::env::temp_dir().join(format!("petrel-kv-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let child = Command::new(nats_server())
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(&dir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        let server = Self { child, dir, port };
        // Up within 10 s or the test fails (the guard kills it either way).
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return server;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("nats-server on port {port} did not start");
    }

    /// Three servers routed into one JetStream cluster.
    pub(crate) async fn cluster(name: &str) -> Vec<Self> {
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let cluster = format!("petrel-kv-{name}-{}", std::process::id());
        let mut servers = Vec::new();
        for (i, own) in routes.iter().enumerate() {
            let others: Vec<String> = routes
                .iter()
                .filter(|p| *p != own)
                .map(|p| format!("nats://127.0.0.1:{p}"))
                .collect();
            let extra = [
                "--cluster".to_owned(),
                format!("nats://127.0.0.1:{own}"),
                "--routes".to_owned(),
                others.join(","),
                "--cluster_name".to_owned(),
                cluster.clone(),
                "--server_name".to_owned(),
                format!("s{i}"),
            ];
            servers.push(Self::spawn(&format!("{name}{i}"), free_port(), &extra).await);
        }
        servers
    }

    /// The server's URL.
    pub(crate) fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// A client of it.
    pub(crate) async fn connect(&self) -> async_nats::Client {
        async_nats::connect(self.url())
            .await
            .expect("connects to nats-server")
    }
}
