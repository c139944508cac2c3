//! Small helpers shared across modules: name suggestions, size and duration parsing.

use std::time::Duration;

/// Levenshtein distance, for "did you mean" suggestions.
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// The closest candidate within a distance that still reads as a typo (a third of the word).
pub(crate) fn nearest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(2);
    candidates
        .into_iter()
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// A size, duration or timestamp that does not read; the message quotes the text as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("invalid size `{0}` (expected e.g. 512M, 1G)")]
    Size(String),
    #[error("invalid size unit in `{0}` (use K, M, G or T)")]
    SizeUnit(String),
    #[error("size `{0}` out of range")]
    SizeRange(String),
    #[error("empty duration")]
    EmptyDuration,
    #[error("invalid duration `{0}` (expected e.g. 30s, 5m, 1h)")]
    Duration(String),
    #[error("invalid duration unit `{unit}` in `{text}` (use ms, s, m, h, d)")]
    DurationUnit { text: String, unit: String },
    #[error("duration `{0}` out of range")]
    DurationRange(String),
    #[error("invalid RFC 3339 timestamp `{0}`")]
    Timestamp(String),
}

/// Parses `512`, `64K`, `256M`, `1G`, `1.5G`, `2GiB` (binary units) into bytes.
pub fn parse_size(s: &str) -> Result<u64, ValueError> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| ValueError::Size(s.to_owned()))?;
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        _ => return Err(ValueError::SizeUnit(s.to_owned())),
    };
    let bytes = n * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(ValueError::SizeRange(s.to_owned()));
    }
    Ok(bytes as u64)
}

/// Parses `90`, `90s`, `1500ms`, `30m`, `2h`, `1h30m`, `7d` into a duration. Text from outside
/// (a session's metadata, a policy) may be hostile: a sum too large for a `Duration` is an
/// error, not an overflow.
pub fn parse_duration(s: &str) -> Result<Duration, ValueError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(ValueError::EmptyDuration);
    }
    if let Ok(secs) = t.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let range = || ValueError::DurationRange(s.to_owned());
    let mut total = Duration::ZERO;
    let mut rest = t;
    while !rest.is_empty() {
        let d = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if d == 0 {
            return Err(ValueError::Duration(s.to_owned()));
        }
        let n: u64 = rest[..d].parse().map_err(|_| range())?;
        rest = &rest[d..];
        let u = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit = &rest[..u];
        rest = &rest[u..];
        let part = match unit {
            "ms" => Some(Duration::from_millis(n)),
            "s" | "" => Some(Duration::from_secs(n)),
            "m" | "min" => n.checked_mul(60).map(Duration::from_secs),
            "h" => n.checked_mul(3600).map(Duration::from_secs),
            "d" => n.checked_mul(86_400).map(Duration::from_secs),
            _ => return Err(ValueError::DurationUnit { text: s.to_owned(), unit: unit.to_owned() }),
        };
        total = part.and_then(|p| total.checked_add(p)).ok_or_else(range)?;
    }
    Ok(total)
}

pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)];
    for (u, m) in UNITS {
        if bytes >= m && bytes % m == 0 {
            return format!("{}{u}", bytes / m);
        }
    }
    bytes.to_string()
}

pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    if d.subsec_millis() != 0 {
        format!("{}ms", d.as_millis())
    } else if s != 0 && s % 86_400 == 0 {
        format!("{}d", s / 86_400)
    } else if s != 0 && s % 3600 == 0 {
        format!("{}h", s / 3600)
    } else if s != 0 && s % 60 == 0 {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

/// Formats a time as RFC 3339 UTC with millisecond precision (`2026-11-23T10:00:00.000Z`).
pub(crate) fn rfc3339(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (proleptic Gregorian), days since 1970-01-01.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60,
        d.subsec_millis()
    )
}

/// Parses an RFC 3339 timestamp (`Z` or a numeric offset, optional fraction).
pub fn parse_rfc3339(s: &str) -> Result<std::time::SystemTime, ValueError> {
    let bad = || ValueError::Timestamp(s.to_owned());
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| s.get(r).and_then(|x| x.parse::<i64>().ok()).ok_or_else(bad);
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, m, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return Err(bad());
    }
    let mut rest = &s[19..];
    let mut nanos = 0u32;
    if let Some(f) = rest.strip_prefix('.') {
        let n = f.find(|c: char| !c.is_ascii_digit()).unwrap_or(f.len());
        if n == 0 {
            return Err(bad());
        }
        let digits = &f[..n.min(9)];
        nanos = digits.parse::<u32>().map_err(|_| bad())? * 10u32.pow(9 - digits.len() as u32);
        rest = &f[n..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        // `get`, not indexing: a multi-byte character across a boundary is a bad timestamp.
        o if o.len() == 6 && (o.starts_with('+') || o.starts_with('-')) && o.get(3..4) == Some(":") => {
            let v = o[1..3].parse::<i64>().map_err(|_| bad())? * 3600 + o[4..6].parse::<i64>().map_err(|_| bad())? * 60;
            if o.starts_with('-') {
                -v
            } else {
                v
            }
        }
        _ => return Err(bad()),
    };
    // Days-from-civil, the inverse of the above.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + m * 60 + sec - offset;
    if secs < 0 {
        return Err(bad());
    }
    Ok(std::time::UNIX_EPOCH + Duration::new(secs as u64, nanos))
}

/// close_range(2) through the raw syscall: musl has no wrapper for it, and the same code must
/// build for the static musl binary and the glibc one.
///
/// # Safety
/// Closing (or marking close-on-exec) descriptors that other code still owns makes its later use
/// of them act on whatever reuses the numbers; callers close only descriptors nothing else in
/// this process will touch again (typically right before exec or `_exit`).
pub(crate) unsafe fn close_range(first: u32, last: u32, flags: u32) -> std::io::Result<()> {
    // SAFETY: the syscall takes integer arguments only; the caller vouches for the descriptors.
    let r = unsafe { libc::syscall(libc::SYS_close_range, first, last, flags) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Closes every descriptor of this process but stdin, stdout, stderr and `keep`: one
/// close_range per gap between the descriptors kept.
///
/// # Safety
/// As for [`close_range`]: nothing may use a closed descriptor again.
pub(crate) unsafe fn close_all_but(keep: &[i32]) -> std::io::Result<()> {
    let mut keep: Vec<u32> = keep.iter().filter(|&&f| f > 2).map(|&f| f as u32).collect();
    keep.sort_unstable();
    keep.dedup();
    let mut next = 3u32;
    for k in keep {
        if k > next {
            // SAFETY: the caller's guarantee covers every descriptor but those kept.
            unsafe { close_range(next, k - 1, 0)? };
        }
        next = k + 1;
    }
    // SAFETY: as above.
    unsafe { close_range(next, u32::MAX, 0) }
}

/// A unit test this host cannot run: said on stderr, and a failure where
/// STOCKADE_STRICT_SKIPS=1 (`.ci/run` sets it and installs what the gated tests need).
#[cfg(test)]
pub(crate) fn skip_test(why: &str) {
    if std::env::var_os("STOCKADE_STRICT_SKIPS").is_some_and(|v| v == "1") {
        panic!("skipped under STOCKADE_STRICT_SKIPS=1: {why}");
    }
    eprintln!("skipped: {why}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_all_but_keeps_exactly_the_list() {
        // In a forked child, whose descriptors are its own to close.
        let files: Vec<std::fs::File> = (0..6).map(|_| std::fs::File::open("/dev/null").unwrap()).collect();
        let fds: Vec<i32> = files.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
        // SAFETY: the child only makes system calls and leaves with _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let keep = [fds[1], fds[4]];
            // SAFETY: this child never uses another descriptor again.
            let ok = unsafe { close_all_but(&keep) }.is_ok();
            // SAFETY: fcntl(F_GETFD) only asks whether a number is open.
            let open = |f: i32| unsafe { libc::fcntl(f, libc::F_GETFD) } >= 0;
            let right = ok && fds.iter().all(|&f| open(f) == keep.contains(&f)) && (0..3).all(open);
            // SAFETY: leaving the forked test child without running the harness.
            unsafe { libc::_exit(if right { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12X").is_err());
        assert!(parse_size("G").is_err());
        assert_eq!(format_size(256 << 20), "256M");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("1500ms").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("45").unwrap(), Duration::from_secs(45));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(7 * 86_400));
        assert_eq!(format_duration(Duration::from_secs(2 * 86_400)), "2d");
        assert!(parse_duration("5x").is_err());
        assert_eq!(format_duration(Duration::from_secs(1800)), "30m");
    }

    #[test]
    fn values_too_large_for_a_duration_are_refused_with_the_text() {
        // Each of these overflowed: a panic in the sum, a silent wrap in the multiplication.
        for s in ["18446744073709551615s1s", "999999999999999999d", "307445734561825861m", "99999999999999999999999s"] {
            assert_eq!(parse_duration(s), Err(ValueError::DurationRange(s.to_owned())), "{s}");
        }
        assert_eq!(parse_duration("213503982334601d").unwrap(), Duration::from_secs(213_503_982_334_601 * 86_400));
        assert_eq!(
            parse_duration("5x").unwrap_err().to_string(),
            "invalid duration unit `x` in `5x` (use ms, s, m, h, d)"
        );
        assert_eq!(parse_duration(" ").unwrap_err().to_string(), "empty duration");
        assert_eq!(parse_size("12X").unwrap_err().to_string(), "invalid size unit in `12X` (use K, M, G or T)");
        assert_eq!(parse_size("1e400").unwrap_err().to_string(), "invalid size unit in `1e400` (use K, M, G or T)");
        assert_eq!(parse_size("99999999999T").unwrap_err().to_string(), "size `99999999999T` out of range");
        assert_eq!(parse_rfc3339("yesterday").unwrap_err().to_string(), "invalid RFC 3339 timestamp `yesterday`");
        // From a server's answer: text of any shape is an error, never a panic.
        for s in [
            "2026-12-01T10:00:00+0\u{e9}00",
            "2026-12-01T10:00:00.\u{e9}Z",
            "2026-12-01T10:00:0\u{e9}Z",
            "2026-12-01T10:00:00+01\u{e9}0",
        ] {
            assert!(parse_rfc3339(s).is_err(), "{s}");
        }
    }

    #[test]
    fn suggestions() {
        assert_eq!(nearest("hostnme", ["hostname", "filesystem"]), Some("hostname"));
        assert_eq!(nearest("zzzzzz", ["hostname"]), None);
    }

    #[test]
    fn timestamps_round_trip() {
        let t = std::time::UNIX_EPOCH + Duration::from_millis(1_795_426_200_123);
        assert_eq!(rfc3339(t), "2026-11-23T09:30:00.123Z");
        assert_eq!(parse_rfc3339("2026-11-23T09:30:00.123Z").unwrap(), t);
        assert_eq!(parse_rfc3339("2026-11-23T11:30:00.123+02:00").unwrap(), t);
        assert_eq!(rfc3339(std::time::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(parse_rfc3339("2000-02-29T23:59:59Z").unwrap()), "2000-02-29T23:59:59.000Z");
        assert!(parse_rfc3339("2026-13-01T00:00:00Z").is_err());
        assert!(parse_rfc3339("yesterday").is_err());
    }
}
