//! A network namespace joined to the root namespace by a veth pair, made and removed by the
//! test itself, with a partition that can be switched on and off.
//!
//! The partition poisons the neighbour (ARP) entry on both ends of the veth pair: frames then
//! carry a destination MAC that no interface owns, and the receiving end drops them as
//! addressed to another host. Nothing is reset and no sender sees an error: TCP just
//! retransmits into the void, which is what a pulled cable or a dead switch looks like. (Not
//! `ip link set down`: the kernel then removes the route and senders get "network
//! unreachable" at once; not `tc netem`: not every kernel has it, this one does not.)

use std::process::Command;

/// Prefix of the namespaces this module makes; the rest of the name is the test's pid, so
/// namespaces left behind by a killed test run can be recognised and removed.
const PREFIX: &str = "gfnet-";
/// A MAC address no interface has (locally administered, unicast).
const NOWHERE_MAC: &str = "02:00:5e:00:de:ad";

/// A network namespace `name` with a veth pair: `host_if` (address `host_ip`) in the root
/// namespace, `ns_if` (address `ns_ip`) inside. Dropping it deletes both, even on panic.
pub struct Netns {
    pub name: String,
    pub host_if: String,
    pub ns_if: String,
    pub host_ip: String,
    pub ns_ip: String,
    mac_host: String,
    mac_ns: String,
}

/// Runs `ip ARGS`; the error says which command failed and why.
fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("`ip {}`: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("`ip {}`: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Netns {
    /// Makes the namespace and the veth pair, with a private /30 taken from 10.231.0.0/16 by
    /// the test's pid. `Err` says why it is not possible here (not root, no `ip`, a
    /// container without CAP_NET_ADMIN, ...): the caller skips.
    pub fn create() -> Result<Netns, String> {
        remove_orphans();
        let pid = std::process::id();
        let name = format!("{PREFIX}{pid}");
        // Interface names are at most 15 bytes; a pid has at most 7 digits.
        let (host_if, ns_if) = (format!("gfh{pid}"), format!("gfn{pid}"));
        let block = (pid % 16384) * 4;
        let (x, y) = (block / 256, block % 256);
        let (host_ip, ns_ip) = (format!("10.231.{x}.{}", y + 1), format!("10.231.{x}.{}", y + 2));
        ip(&["netns", "add", &name])?;
        let mut net =
            Netns { name, host_if, ns_if, host_ip, ns_ip, mac_host: String::new(), mac_ns: String::new() };
        // From here on, dropping `net` removes whatever was made.
        let (n, h, i) = (net.name.clone(), net.host_if.clone(), net.ns_if.clone());
        ip(&["link", "add", &h, "type", "veth", "peer", "name", &i])?;
        ip(&["link", "set", &i, "netns", &n])?;
        ip(&["addr", "add", &format!("{}/30", net.host_ip), "dev", &h])?;
        ip(&["link", "set", &h, "up"])?;
        ip(&["-n", &n, "addr", "add", &format!("{}/30", net.ns_ip), "dev", &i])?;
        ip(&["-n", &n, "link", "set", &i, "up"])?;
        ip(&["-n", &n, "link", "set", "lo", "up"])?;
        net.mac_host = mac(&ip(&["link", "show", &h])?)?;
        net.mac_ns = mac(&ip(&["-n", &n, "link", "show", &i])?)?;
        // Check that the partition can be switched before anyone relies on it.
        net.cut()?;
        net.heal()?;
        Ok(net)
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        // `ip netns exec` execs the program in place: the child is the program itself.
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Partitions the namespace from the root namespace: every frame either way is dropped.
    pub fn cut(&self) -> Result<(), String> {
        self.set_neighbours(NOWHERE_MAC, NOWHERE_MAC)
    }

    /// Ends the partition. The entries stay static (with the true MACs) so that no ARP
    /// exchange delays the heal.
    pub fn heal(&self) -> Result<(), String> {
        let (host, ns) = (self.mac_host.clone(), self.mac_ns.clone());
        self.set_neighbours(&ns, &host)
    }

    /// Host side: the namespace's address is at `to_ns`; namespace side: the host's address is
    /// at `to_host`.
    fn set_neighbours(&self, to_ns: &str, to_host: &str) -> Result<(), String> {
        ip(&["neigh", "replace", &self.ns_ip, "lladdr", to_ns, "dev", &self.host_if, "nud", "permanent"])?;
        ip(&[
            "-n",
            &self.name,
            "neigh",
            "replace",
            &self.host_ip,
            "lladdr",
            to_host,
            "dev",
            &self.ns_if,
            "nud",
            "permanent",
        ])?;
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting either end of a veth pair deletes both; deleting the namespace would too,
        // but only once no process holds it, so the link goes first.
        let _ = ip(&["link", "del", &self.host_if]);
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("warning: could not remove network namespace {}: {e}", self.name);
        }
    }
}

/// The MAC address in the output of `ip link show`.
fn mac(show: &str) -> Result<String, String> {
    show.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .map(str::to_string)
        .ok_or_else(|| format!("no MAC address in `ip link show`: {show}"))
}

/// Removes namespaces of this module whose test process is gone (a run killed before its
/// guard could clean up); their veth pairs go with them. Call it with no namespace of this
/// process alive.
fn remove_orphans() {
    let Ok(list) = ip(&["netns", "list"]) else { return };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = name.strip_prefix(PREFIX).and_then(|p| p.parse::<u32>().ok()) else { continue };
        // Our own pid: left by an earlier process that had it (this one makes one at a time).
        if pid == std::process::id() || !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}
