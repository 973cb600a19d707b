//! The exit node's DNS resolver in namespaces, shared by its test
//! (`tests/dns_resolver.rs`) and its benchmark (`benches/dns_resolver.rs`):
//! the namespaces, the upstream for `nexd.test.` (the testkit's
//! `DnsServer`, which notes who asked), the resolver under test on a
//! runtime inside the exit namespace, and the clients' queries (the
//! testkit's stub).
#![allow(dead_code, reason = "the test and the benchmark each use part of it")]

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context as _, bail};
use nexd::dns::{self, DnsConfig, DnsCounters};
use nexd_testkit::{
    Netns,
    dns::{DnsServer, Message, Outcome, RecordType, Stub, Transport, exchange},
    netns::veth,
};

/// The three namespaces: a client on the exit node's `wg0` (a veth), the
/// exit node, and the internet behind its uplink (192.0.2.0/24) with the
/// upstream's address on lo. `client_addrs` go on the client's `c0`.
pub struct Lab {
    pub client: Netns,
    pub exit: Netns,
    pub inet: Netns,
}

impl Lab {
    pub fn new(tag: &str, client_addrs: &[&str]) -> anyhow::Result<Self> {
        let client = Netns::new(&format!("{tag}client"))?;
        let exit = Netns::new(&format!("{tag}exit"))?;
        let inet = Netns::new(&format!("{tag}inet"))?;
        veth(&client, "c0", &exit, "wg0")?;
        veth(&exit, "up0", &inet, "eth0")?;
        for a in client_addrs {
            client.ip(&format!("addr add {a} dev c0"))?;
        }
        for a in ["100.64.0.1/10", "fd6e:6578:6400::1/48"] {
            exit.ip(&format!("addr add {a} dev wg0"))?;
        }
        exit.ip("addr add 192.0.2.1/24 dev up0")?;
        exit.ip("route add default via 192.0.2.254")?;
        inet.ip("addr add 192.0.2.254/24 dev eth0")?;
        inet.ip(&format!("addr add {UPSTREAM}/32 dev lo"))?;
        Ok(Lab { client, exit, inet })
    }
}

pub const UPSTREAM: &str = "203.0.113.53";
pub const WWW_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
pub const WWW_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7);
/// How long a query waits for its answer.
pub const WAIT: Duration = Duration::from_secs(3);

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

// ---- the upstream: an authoritative server that notes who asked -------------

/// How long the upstream's answers may be cached: the benchmark measures
/// the resolver answering from its cache.
pub const UPSTREAM_TTL: u32 = 300;

/// Starts the upstream on `UPSTREAM:53` in `inet`, answering
/// `www.nexd.test.` with `WWW_V4` and `WWW_V6`; it notes who asked, and
/// stops when dropped.
pub fn upstream(inet: &Netns) -> anyhow::Result<DnsServer> {
    DnsServer::start_with_ttl(
        inet,
        &[ip(UPSTREAM)],
        "www.nexd.test.",
        WWW_V4,
        WWW_V6,
        UPSTREAM_TTL,
    )
}

// ---- the resolver under test, on its own runtime inside the exit node ------

pub enum Command {
    /// Replace the allowed sources; the reply says it is done, so the
    /// next query meets the new set (not a race with the resolver task).
    Allow(Vec<IpAddr>, mpsc::Sender<()>),
    Counters(mpsc::Sender<DnsCounters>),
    /// Stop, then start again on the same port.
    Restart(mpsc::Sender<Result<(), String>>),
}

pub struct Resolver {
    commands: tokio::sync::mpsc::Sender<Command>,
}

impl Resolver {
    /// Starts `nexd::dns` in `exit` (its sockets, and hickory's upstream
    /// sockets, belong to the exit namespace: the runtime is a current-
    /// thread one on a thread inside it).
    pub fn start(exit: &Netns, config: DnsConfig, allowed: Vec<IpAddr>) -> anyhow::Result<Self> {
        let (commands, mut rx) = tokio::sync::mpsc::channel(8);
        let (ready_tx, ready) = mpsc::channel();
        let _thread = exit.spawn_in(move || -> anyhow::Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let mut handle = match dns::start(config.clone(), allowed.clone()) {
                    Ok(h) => h,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return Ok(());
                    }
                };
                let _ = ready_tx.send(Ok(()));
                while let Some(cmd) = rx.recv().await {
                    match cmd {
                        Command::Allow(a, done) => {
                            handle.update_allowed(a);
                            let _ = done.send(());
                        }
                        Command::Counters(reply) => {
                            let _ = reply.send(handle.counters());
                        }
                        Command::Restart(reply) => {
                            handle.shutdown().await;
                            match dns::start(config.clone(), allowed.clone()) {
                                Ok(h) => {
                                    handle = h;
                                    let _ = reply.send(Ok(()));
                                }
                                Err(e) => {
                                    let _ = reply.send(Err(e.to_string()));
                                    return Ok(());
                                }
                            }
                        }
                    }
                }
                handle.shutdown().await;
                Ok(())
            })
        })?;
        match ready.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(Resolver { commands }),
            Ok(Err(e)) => bail!("resolver did not start: {e}"),
            Err(e) => bail!("resolver did not start: {e}"),
        }
    }

    pub fn send(&self, cmd: Command) -> anyhow::Result<()> {
        self.commands
            .blocking_send(cmd)
            .map_err(|_| anyhow::anyhow!("resolver thread gone"))
    }

    pub fn allow(&self, addrs: &[&str]) -> anyhow::Result<()> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::Allow(addrs.iter().map(|a| ip(a)).collect(), tx))?;
        Ok(rx.recv_timeout(WAIT)?)
    }

    pub fn counters(&self) -> anyhow::Result<DnsCounters> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::Counters(tx))?;
        Ok(rx.recv_timeout(WAIT)?)
    }

    pub fn restart(&self) -> anyhow::Result<()> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::Restart(tx))?;
        rx.recv_timeout(Duration::from_secs(10))?
            .map_err(|e| anyhow::anyhow!("restart: {e}"))
    }
}

// ---- clients ------------------------------------------------------------------

/// One UDP query from `src` (an address of `ns`) to `server:53`; `None`
/// if nothing came back within `WAIT` (two tries).
pub fn udp_query(
    ns: &Netns,
    src: &str,
    server: &str,
    name: &str,
    rtype: RecordType,
) -> anyhow::Result<Option<Message>> {
    let stub = Stub {
        transport: Transport::Udp,
        source: Some(ip(src)),
        wait: WAIT / 2,
        tries: 2,
    };
    exchange(ns, ip(server), name, rtype, stub)
}

/// One query over TCP from `ns` to `server:53`; `None` if the connection
/// was refused or closed, or nothing came back within `WAIT`.
pub fn tcp_query(
    ns: &Netns,
    server: &str,
    name: &str,
    rtype: RecordType,
) -> anyhow::Result<Option<Message>> {
    let stub = Stub {
        transport: Transport::Tcp,
        source: None,
        wait: WAIT,
        tries: 1,
    };
    exchange(ns, ip(server), name, rtype, stub)
}

/// The addresses `m` answered with; an error, naming `what`, if nothing
/// came back or the answer is not NOERROR.
pub fn answered(m: Option<Message>, what: &str) -> anyhow::Result<Vec<IpAddr>> {
    Outcome::of(m.as_ref()).addresses().context(what.to_owned())
}

/// A file removed when the test ends, however it ends.
pub struct TempFile(pub std::path::PathBuf);

impl TempFile {
    pub fn new(name: &str, content: &str) -> anyhow::Result<Self> {
        let path =
            std::env::temp_dir().join(format!("nexd-dns-test-{}-{name}", std::process::id()));
        std::fs::write(&path, content)?;
        Ok(TempFile(path))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
