//! What a jail sees of itself once built: its mount table, credentials and limits, read by its
//! init just before the command starts (`read_own`, as plain as it gets: four files) and taken
//! apart by the supervisor (`Seen::parse`). `stockade run --report` describes the jail from this,
//! not from the policy, so a mount the policy meant read-only and the kernel made writable, or a
//! limit that did not apply, shows as what it is.

use serde::Serialize;

/// The files read, in the jail, by its init.
const FILES: &[&str] = &["/proc/self/mountinfo", "/proc/self/status", "/proc/self/limits", "/proc/self/uid_map"];

/// In the jail: the files' texts (empty when one cannot be read).
pub(super) fn read_own() -> Vec<(&'static str, String)> {
    FILES.iter().map(|f| (*f, std::fs::read_to_string(f).unwrap_or_default())).collect()
}

/// One mount of the jail's table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SeenMount {
    pub path: String,
    pub writable: bool,
    pub fstype: String,
    /// Where it comes from: the host's device for a bind of a host path, else the fs type.
    pub source: String,
}

/// The jail's view of itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Seen {
    pub mounts: Vec<SeenMount>,
    /// `CapInh`, `CapPrm`, `CapEff`, `CapBnd`, `CapAmb` as the kernel shows them (hex).
    pub capabilities: Vec<(String, String)>,
    pub no_new_privs: bool,
    /// `Seccomp:` 0 none, 1 strict, 2 filter; and how many filters.
    pub seccomp_mode: u32,
    pub seccomp_filters: u32,
    /// The jail's uid as the host sees it: `uid_map`'s first line.
    pub uid_map: String,
    /// Soft limits by the kernel's name ("Max open files" …), "unlimited" or a number.
    pub limits: Vec<(String, String)>,
}

impl Seen {
    pub(super) fn parse(raw: &[(String, String)]) -> Seen {
        let file = |name: &str| raw.iter().find(|(n, _)| n == name).map(|(_, t)| t.as_str()).unwrap_or("");
        let mut seen = Seen::default();
        for line in file("/proc/self/mountinfo").lines() {
            // id parent major:minor root mountpoint options [optional…] - fstype source super
            let (left, right) = line.split_once(" - ").unwrap_or((line, ""));
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            if l.len() < 6 {
                continue;
            }
            let writable = l[5].split(',').any(|o| o == "rw");
            seen.mounts.push(SeenMount {
                path: unescape(l[4]),
                writable,
                fstype: r.first().copied().unwrap_or("").to_owned(),
                source: r.get(1).copied().unwrap_or("").to_owned(),
            });
        }
        for line in file("/proc/self/status").lines() {
            let Some((k, v)) = line.split_once(':') else { continue };
            let v = v.trim();
            match k {
                "CapInh" | "CapPrm" | "CapEff" | "CapBnd" | "CapAmb" => seen.capabilities.push((k.into(), v.into())),
                "NoNewPrivs" => seen.no_new_privs = v == "1",
                "Seccomp" => seen.seccomp_mode = v.parse().unwrap_or(0),
                "Seccomp_filters" => seen.seccomp_filters = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        seen.uid_map =
            file("/proc/self/uid_map").lines().next().unwrap_or("").split_whitespace().collect::<Vec<_>>().join(" ");
        // "Limit  Soft Limit  Hard Limit  Units": the name ends where two spaces begin.
        for line in file("/proc/self/limits").lines().skip(1) {
            let Some(at) = line.find("  ") else { continue };
            let name = line[..at].trim().to_owned();
            let soft = line[at..].split_whitespace().next().unwrap_or("").to_owned();
            seen.limits.push((name, soft));
        }
        seen
    }

    /// The writable mounts, as `path (source)`.
    pub fn writable(&self) -> Vec<String> {
        self.mounts.iter().filter(|m| m.writable).map(|m| format!("{} ({})", m.path, m.source)).collect()
    }

    /// Whether every capability set is empty.
    pub fn no_capabilities(&self) -> bool {
        !self.capabilities.is_empty() && self.capabilities.iter().all(|(_, v)| v.trim_start_matches('0').is_empty())
    }

    /// A soft limit by the kernel's name.
    pub fn limit(&self, name: &str) -> Option<&str> {
        self.limits.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_jails_files_are_read_as_the_kernel_writes_them() {
        let raw = vec![
            (
                "/proc/self/mountinfo".to_owned(),
                "1 0 0:1 / / ro,nosuid - tmpfs tmpfs ro\n2 1 254:0 /srv/a\\040b /data rw,relatime - ext4 /dev/vda rw\n"
                    .to_owned(),
            ),
            (
                "/proc/self/status".to_owned(),
                "CapInh:\t0000000000000000\nCapEff:\t0000000000000000\nNoNewPrivs:\t1\nSeccomp:\t2\nSeccomp_filters:\t2\n"
                    .to_owned(),
            ),
            (
                "/proc/self/limits".to_owned(),
                "Limit                     Soft Limit           Hard Limit           Units     \nMax open files            4096                 4096                 files     \nMax address space         unlimited            unlimited            bytes     \n"
                    .to_owned(),
            ),
            ("/proc/self/uid_map".to_owned(), "      1000     101000          1\n".to_owned()),
        ];
        let s = Seen::parse(&raw);
        assert_eq!(s.writable(), ["/data (/dev/vda)"]);
        assert_eq!(s.mounts[1].path, "/data");
        assert!(s.no_capabilities() && s.no_new_privs);
        assert_eq!((s.seccomp_mode, s.seccomp_filters), (2, 2));
        assert_eq!(s.limit("Max open files"), Some("4096"));
        assert_eq!(s.limit("Max address space"), Some("unlimited"));
        assert_eq!(s.uid_map, "1000 101000 1");
        assert_eq!(unescape("/srv/a\\040b"), "/srv/a b");
    }
}
