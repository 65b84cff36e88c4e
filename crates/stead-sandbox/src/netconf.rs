//! Egress for the instances whose app asks for it ([`NetworkMode::Egress`]).
//!
//! By default an instance's network namespace has only `lo`: it reaches
//! nothing, by construction (no interface, no route), and the agent
//! reaches it with a socket made inside the namespace. An egress instance
//! also gets a veth pair: `stv<slot>` on the host, `eth0` inside, a /30 of
//! the host's private pool (default 10.213.0.0/16), a default route via the
//! host end, and source NAT on the way out. One nftables table, the same
//! for every instance (it matches the `stv*` interfaces and the pool, so
//! nothing is added or removed per instance), keeps that to the outside
//! world:
//!
//! * input from `stv*`: dropped. Nothing on the host is reachable (the
//!   agent, the control plane, the router, every instance's endpoint, any
//!   service on the host's addresses);
//! * forwarded from `stv*` to `stv*`: dropped (no instance reaches another);
//! * forwarded from `stv*` to a denied destination: dropped. By default
//!   the private, shared, link-local and loopback ranges (other hosts'
//!   platform ports, the cloud's metadata service); configurable;
//! * forwarded from `stv*` otherwise: accepted and masqueraded; replies
//!   come back, new connections towards `stv*` do not.
//!
//! The veth pair dies with the namespace: an instance that exits, is
//! killed or fails to start leaves nothing to clean up. The pure parts
//! (addresses, the ruleset, the `ip` batch) are unit-tested; the rest runs
//! `ip` and `nft`.
//!
//! [`NetworkMode::Egress`]: crate::NetworkMode::Egress

use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

/// Prefix of the host ends' names.
pub const IFACE_PREFIX: &str = "stv";

/// An IPv4 network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Net {
    pub const fn new(addr: Ipv4Addr, prefix: u8) -> Self {
        Ipv4Net { addr, prefix }
    }

    /// Parses `a.b.c.d/n`.
    pub fn parse(s: &str) -> Option<Self> {
        let (a, p) = s.split_once('/')?;
        let prefix: u8 = p.parse().ok().filter(|p| *p <= 32)?;
        Some(Ipv4Net {
            addr: a.parse().ok()?,
            prefix,
        })
    }

    fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }

    /// The network address (host bits cleared).
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network())
    }
}

impl std::fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network(), self.prefix)
    }
}

/// The host's egress settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// Where instances' /30s come from. Must not be used on the host's
    /// networks.
    pub pool: Ipv4Net,
    /// Destinations egress instances may not reach.
    pub deny: Vec<Ipv4Net>,
}

/// Destinations denied by default: everything that is not the public
/// internet.
pub const DEFAULT_DENY: &[(Ipv4Addr, u8)] = &[
    (Ipv4Addr::new(0, 0, 0, 0), 8),
    (Ipv4Addr::new(10, 0, 0, 0), 8),
    (Ipv4Addr::new(100, 64, 0, 0), 10),
    (Ipv4Addr::new(127, 0, 0, 0), 8),
    (Ipv4Addr::new(169, 254, 0, 0), 16),
    (Ipv4Addr::new(172, 16, 0, 0), 12),
    (Ipv4Addr::new(192, 168, 0, 0), 16),
    (Ipv4Addr::new(224, 0, 0, 0), 4),
    (Ipv4Addr::new(240, 0, 0, 0), 4),
];

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            pool: Ipv4Net::new(Ipv4Addr::new(10, 213, 0, 0), 16),
            deny: DEFAULT_DENY
                .iter()
                .map(|(a, p)| Ipv4Net::new(*a, *p))
                .collect(),
        }
    }
}

/// One instance's link: the slot's /30.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    pub slot: u32,
    /// The host end's address (the instance's gateway).
    pub host: Ipv4Addr,
    /// `eth0`'s address inside.
    pub inside: Ipv4Addr,
}

impl NetConfig {
    /// How many /30s the pool holds.
    pub fn slots(&self) -> u32 {
        let bits = 32 - u32::from(self.pool.prefix.min(30));
        (1u32 << bits.min(31)) / 4
    }

    /// The addresses of `slot`.
    pub fn link(&self, slot: u32) -> Link {
        let base = u32::from(self.pool.network()) + slot * 4;
        Link {
            slot,
            host: Ipv4Addr::from(base + 1),
            inside: Ipv4Addr::from(base + 2),
        }
    }

    /// The nftables table of this pool: one per pool, so agents with
    /// different pools on one host do not undo each other's rules.
    pub fn table(&self) -> String {
        let n = self.pool.network().octets();
        format!(
            "stead_{}_{}_{}_{}_{}",
            n[0], n[1], n[2], n[3], self.pool.prefix
        )
    }

    /// The whole ruleset (`nft -f -`), replacing the table if it exists.
    pub fn ruleset(&self) -> String {
        let t = self.table();
        let pool = self.pool;
        let deny = if self.deny.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = self.deny.iter().map(|d| d.to_string()).collect();
            format!(
                "    iifname \"{IFACE_PREFIX}*\" ip daddr {{ {} }} drop\n",
                list.join(", ")
            )
        };
        format!(
            "table inet {t} {{}}\n\
             delete table inet {t}\n\
             table inet {t} {{\n\
             \x20 chain input {{\n\
             \x20   type filter hook input priority -10; policy accept;\n\
             \x20   iifname \"{IFACE_PREFIX}*\" drop\n\
             \x20 }}\n\
             \x20 chain forward {{\n\
             \x20   type filter hook forward priority -10; policy accept;\n\
             \x20   iifname \"{IFACE_PREFIX}*\" oifname \"{IFACE_PREFIX}*\" drop\n\
             \x20   iifname \"{IFACE_PREFIX}*\" ip daddr {pool} drop\n\
             {deny}\
             \x20   iifname \"{IFACE_PREFIX}*\" meta nfproto ipv6 drop\n\
             \x20   iifname \"{IFACE_PREFIX}*\" accept\n\
             \x20   oifname \"{IFACE_PREFIX}*\" ct state established,related accept\n\
             \x20   oifname \"{IFACE_PREFIX}*\" drop\n\
             \x20 }}\n\
             \x20 chain postrouting {{\n\
             \x20   type nat hook postrouting priority 100; policy accept;\n\
             \x20   ip saddr {pool} oifname != \"{IFACE_PREFIX}*\" masquerade\n\
             \x20 }}\n\
             }}\n"
        )
    }
}

/// The `ip -batch` that creates slot `link`'s pair, moving `eth0` into the
/// namespace of `pid`, and brings the host end up.
pub fn ip_batch(link: &Link, pid: u32) -> String {
    let name = format!("{IFACE_PREFIX}{}", link.slot);
    format!(
        "link add {name} type veth peer name eth0 netns {pid}\n\
         addr add {}/30 dev {name}\n\
         link set {name} up\n",
        link.host
    )
}

fn run_with_input(program: &str, args: &[&str], input: &str) -> io::Result<()> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Installs the ruleset and turns forwarding on (needed to route the
/// instances' traffic out; the ruleset forwards nothing but theirs that
/// was not forwarded before). Idempotent.
pub fn install(cfg: &NetConfig) -> io::Result<()> {
    run_with_input("nft", &["-f", "-"], &cfg.ruleset())?;
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
}

/// Creates a pair for the sandbox whose outer init is `pid`, in the first
/// free slot. Returns the link.
pub fn create_link(cfg: &NetConfig, pid: u32) -> io::Result<Link> {
    let mut last = None;
    for slot in 0..cfg.slots() {
        if std::path::Path::new(&format!("/sys/class/net/{IFACE_PREFIX}{slot}")).exists() {
            continue;
        }
        let link = cfg.link(slot);
        match run_with_input("ip", &["-batch", "-"], &ip_batch(&link, pid)) {
            Ok(()) => return Ok(link),
            // Taken meanwhile (another agent on this host): next one.
            Err(e) if e.to_string().contains("File exists") => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("the egress address pool is exhausted")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nets() {
        let n = Ipv4Net::parse("10.213.7.9/16").unwrap();
        assert_eq!(n.to_string(), "10.213.0.0/16");
        assert!(n.contains("10.213.255.1".parse().unwrap()));
        assert!(!n.contains("10.214.0.1".parse().unwrap()));
        assert!(Ipv4Net::parse("10.0.0.0/33").is_none());
        assert!(Ipv4Net::parse("nope").is_none());
        assert!(Ipv4Net::parse("0.0.0.0/0")
            .unwrap()
            .contains("1.2.3.4".parse().unwrap()));
    }

    #[test]
    fn slots_and_links() {
        let c = NetConfig::default();
        assert_eq!(c.slots(), 16384);
        let l = c.link(0);
        assert_eq!(l.host, Ipv4Addr::new(10, 213, 0, 1));
        assert_eq!(l.inside, Ipv4Addr::new(10, 213, 0, 2));
        let l = c.link(16383);
        assert_eq!(l.inside, Ipv4Addr::new(10, 213, 255, 254));
        assert!(c.pool.contains(l.host));
        assert_eq!(
            ip_batch(&c.link(3), 42),
            "link add stv3 type veth peer name eth0 netns 42\naddr add 10.213.0.13/30 dev stv3\nlink set stv3 up\n"
        );
    }

    #[test]
    fn ruleset_denies_the_host_other_instances_and_private_ranges() {
        let c = NetConfig::default();
        let r = c.ruleset();
        assert!(r.starts_with(
            "table inet stead_10_213_0_0_16 {}\ndelete table inet stead_10_213_0_0_16\n"
        ));
        assert!(r.contains("iifname \"stv*\" drop"), "{r}");
        assert!(r.contains("iifname \"stv*\" oifname \"stv*\" drop"), "{r}");
        assert!(r.contains("ip daddr 10.213.0.0/16 drop"), "{r}");
        assert!(r.contains("169.254.0.0/16"), "{r}");
        assert!(r.contains("192.168.0.0/16"), "{r}");
        assert!(r.contains("ip saddr 10.213.0.0/16 oifname != \"stv*\" masquerade"));
        // Deny comes before the accept.
        assert!(r.find("10.0.0.0/8").unwrap() < r.find("iifname \"stv*\" accept").unwrap());
    }
}
