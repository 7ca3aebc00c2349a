//! A small private network per test, made of Linux network namespaces, so
//! that a test can cut real links between real processes.
//!
//! ```text
//!            router (its own namespace, forwarding on)
//!   h1 10.77.1.1/24   h2 10.77.2.1/24   …   + blackhole 10.77.0.0/16
//!        │ veth            │ veth
//!   host 1: eth0 10.77.1.2/24, lo      host 2: eth0 10.77.2.2/24, lo   …
//! ```
//!
//! Every host is a namespace with one veth to the router (default route
//! through it) and `lo` up; nothing is added to the machine's own (root)
//! namespace, so two tests, or two test binaries, using the same addresses
//! never see each other: only the namespaces' names are shared, and they
//! carry the process id and a counter (`strife-<pid>-<n>-<host>`).
//!
//! - [`Net::cut`] / [`Net::heal`]: a cut between two hosts is a pair of
//!   `ip rule … blackhole` at the router, one each way: the router drops
//!   their packets without a word, as a real partition does (a blackhole
//!   *route* at a host would not do: its own senders get `EINVAL` at once).
//! - [`Host::isolate`] / [`Host::rejoin`]: the router's end of the host's
//!   link goes down (`ip link set … down`), as if its cable were pulled;
//!   the router's blackhole for the whole network then drops, silently,
//!   what others send it.
//! - Slowing a link (`tc qdisc … netem` delay or loss) is not offered: the
//!   kernel of these machines has no `sch_netem`, and modules cannot be
//!   loaded.
//!
//! Needs root (CI runs as root) and iproute2; without them a test fails
//! saying so, it never skips. Everything is removed when the [`Net`] is
//! dropped, even by a panic; namespaces a killed earlier process with the
//! same id left are removed first.

use super::Run;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, Once};

/// What to install when `ip` is missing or fails.
const NEEDS: &str = "the partition tests need root and iproute2 (apt-get install -y iproute2): \
                     they make network namespaces and veth pairs";
/// The network every host's address is in (each host its own /24).
pub const NETWORK: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 77, 0, 0), 16);
/// Most hosts on one network (one /24 each).
const HOSTS_MAX: u8 = 200;
/// The priority of the router's rules that cut pairs of hosts (before the
/// main table's, 32766).
const CUT_RULE_PREF: &str = "1000";

/// Runs `ip ARGS`; panics with its output and what the tests need when it
/// fails.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running `ip {}`: {e}\n{NEEDS}", args.join(" ")));
    assert!(
        out.status.success(),
        "`ip {}` failed ({}): {}\n{NEEDS}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The namespaces `ip netns list` shows.
fn namespaces() -> Vec<String> {
    ip(&["netns", "list"]).lines().filter_map(|l| l.split_whitespace().next()).map(str::to_owned).collect()
}

/// A private network: a router and the hosts added to it. Dropping it
/// deletes every namespace (and with them their links).
pub struct Net {
    /// `strife-<pid>-<n>`: the start of every namespace's name.
    prefix: String,
    /// The router's namespace.
    router: String,
    /// The hosts' namespaces, to delete.
    hosts: Mutex<Vec<String>>,
}

/// One host of a [`Net`]: a namespace with one address.
#[derive(Debug, Clone)]
pub struct Host {
    /// The name the test gave it.
    pub name: String,
    /// Its namespace.
    ns: String,
    /// The router's namespace, and the router's end of this host's link.
    router: String,
    port: String,
    /// Its address.
    addr: Ipv4Addr,
}

impl Net {
    /// A router in a namespace of its own, forwarding, and no host yet.
    pub fn new() -> Net {
        static N: AtomicU32 = AtomicU32::new(0);
        static STALE_REMOVED: Once = Once::new();
        let own = format!("strife-{}-", std::process::id());
        // Left by a killed process that had this id; once, before this
        // process makes any (the others wait for it).
        STALE_REMOVED.call_once(|| {
            for stale in namespaces().into_iter().filter(|n| n.starts_with(&own)) {
                let _ = Command::new("ip").args(["netns", "delete", &stale]).status();
            }
        });
        let prefix = format!("{own}{}", N.fetch_add(1, Ordering::SeqCst));
        let router = format!("{prefix}-router");
        ip(&["netns", "add", &router]);
        let net = Net { prefix, router, hosts: Mutex::new(Vec::new()) };
        ip(&["-n", &net.router, "link", "set", "lo", "up"]);
        let forwarding = Command::new("ip")
            .args(["netns", "exec", &net.router, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])
            .status()
            .unwrap_or_else(|e| panic!("enabling forwarding: {e}\n{NEEDS}"));
        assert!(forwarding.success(), "enabling forwarding in {}: {forwarding}\n{NEEDS}", net.router);
        let (network, bits) = NETWORK;
        ip(&["-n", &net.router, "route", "add", "blackhole", &format!("{network}/{bits}")]);
        net
    }

    /// Adds a host called `name` (letters, digits, `-`): its namespace,
    /// its link to the router, its address.
    pub fn host(&self, name: &str) -> Host {
        let mut hosts = self.hosts.lock().expect("hosts");
        let index = u8::try_from(hosts.len() + 1).ok().filter(|i| *i <= HOSTS_MAX).expect("too many hosts");
        let ns = format!("{}-{name}", self.prefix);
        ip(&["netns", "add", &ns]);
        hosts.push(ns.clone());
        let port = format!("h{index}");
        let [a, b, ..] = NETWORK.0.octets();
        let addr = Ipv4Addr::new(a, b, index, 2);
        let gateway = Ipv4Addr::new(a, b, index, 1);
        let r = &self.router;
        ip(&["-n", r, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns]);
        ip(&["-n", r, "addr", "add", &format!("{gateway}/24"), "dev", &port]);
        ip(&["-n", r, "link", "set", &port, "up"]);
        ip(&["-n", &ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&["-n", &ns, "route", "add", "default", "via", &gateway.to_string()]);
        Host { name: name.to_owned(), ns, router: r.clone(), port, addr }
    }

    /// Cuts `a` and `b` apart, both ways: the router drops their packets
    /// silently. Every other link stays.
    pub fn cut(&self, a: &Host, b: &Host) {
        for (from, to) in [(a, b), (b, a)] {
            let (from, to) = (from.addr.to_string(), to.addr.to_string());
            ip(&[
                "-n",
                &self.router,
                "rule",
                "add",
                "from",
                &from,
                "to",
                &to,
                "blackhole",
                "pref",
                CUT_RULE_PREF,
            ]);
        }
    }

    /// Undoes [`Net::cut`] of `a` and `b`.
    pub fn heal(&self, a: &Host, b: &Host) {
        for (from, to) in [(a, b), (b, a)] {
            let (from, to) = (from.addr.to_string(), to.addr.to_string());
            ip(&[
                "-n",
                &self.router,
                "rule",
                "del",
                "from",
                &from,
                "to",
                &to,
                "blackhole",
                "pref",
                CUT_RULE_PREF,
            ]);
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // A namespace's veths go with it; processes still inside keep it
        // alive, nameless, until they end.
        let hosts = std::mem::take(&mut *self.hosts.lock().unwrap_or_else(|p| p.into_inner()));
        for ns in hosts.iter().chain(std::iter::once(&self.router)) {
            let _ = Command::new("ip").args(["netns", "delete", ns]).stderr(Stdio::null()).status();
        }
    }
}

impl Host {
    /// Its address.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// `ADDR:0`: a free port of its address, for `--listen`.
    pub fn listen_any(&self) -> String {
        format!("{}:0", self.addr)
    }

    /// A command that runs `program` inside this host (`ip netns exec NS
    /// program`; `ip` execs it, so the child's pid is the program's).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns]).arg(program);
        cmd
    }

    /// Runs `f` on a thread of this process that entered the host's network
    /// namespace: its sockets, and the processes it starts, are the host's.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.ns);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns =
                    std::fs::File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}\n{NEEDS}"));
                nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("entering {path}: {e}\n{NEEDS}"));
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Pulls this host's cable: the router's end of its link goes down.
    pub fn isolate(&self) {
        ip(&["-n", &self.router, "link", "set", &self.port, "down"]);
    }

    /// Plugs it back in.
    pub fn rejoin(&self) {
        ip(&["-n", &self.router, "link", "set", &self.port, "up"]);
    }

    /// `strife --dir DIR ARGS` run inside this host, to its end.
    pub fn cli(&self, dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Run {
        super::run_cli_with(self.command(super::BIN), dir, args, envs)
    }
}

/// A self-check of the helper: hosts reach each other, a cut stops exactly
/// one pair, an isolated host reaches nobody, and healing restores all.
pub fn self_check() {
    let net = Net::new();
    let (a, b, c) = (net.host("a"), net.host("b"), net.host("c"));
    let listener = c.run(|| std::net::TcpListener::bind((c.addr(), 0)).expect("bind"));
    let port = listener.local_addr().expect("addr").port();
    // A connection that should be made has the whole bound; one that should
    // not is given half a second (a cut that failed would connect at once).
    let connects = |from: &Host, to: &Host, port: u16, within: std::time::Duration| {
        let target = std::net::SocketAddr::from((to.addr(), port));
        from.run(|| std::net::TcpStream::connect_timeout(&target, within).is_ok())
    };
    let reaches = |from: &Host, to: &Host, port: u16| connects(from, to, port, super::WAIT);
    let blocked =
        |from: &Host, to: &Host, port: u16| !connects(from, to, port, std::time::Duration::from_millis(500));
    assert!(reaches(&a, &c, port) && reaches(&b, &c, port), "hosts reach each other");
    net.cut(&a, &c);
    assert!(blocked(&a, &c, port), "a cut pair does not");
    assert!(reaches(&b, &c, port), "others still do");
    net.heal(&a, &c);
    assert!(reaches(&a, &c, port), "a healed pair does again");
    c.isolate();
    assert!(blocked(&a, &c, port) && blocked(&b, &c, port), "an isolated host is reached by nobody");
    c.rejoin();
    assert!(reaches(&b, &c, port), "a host that rejoined is reached again");
    drop(listener);
    let names = [a.ns.clone(), net.router.clone()];
    drop(net);
    let left = namespaces();
    assert!(names.iter().all(|n| !left.contains(n)), "namespaces removed: {left:?}");
}
