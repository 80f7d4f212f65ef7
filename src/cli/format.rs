//! Numbers as an operator reads them at a glance: `1.2k`, `3.4 MiB/s`, `1.5ms`, `3h12m`.

/// A count or rate in a few characters: `950`, `1.2k`, `34k`, `5.6M`.
pub(crate) fn count(n: f64) -> String {
    if !n.is_finite() || n < 0.0 {
        return "-".to_owned();
    }
    let (value, suffix) = if n >= 1e9 {
        (n / 1e9, "G")
    } else if n >= 1e6 {
        (n / 1e6, "M")
    } else if n >= 1e3 {
        (n / 1e3, "k")
    } else {
        (n, "")
    };
    if suffix.is_empty() && value.fract() == 0.0 {
        format!("{value:.0}")
    } else if value < 10.0 {
        format!("{value:.1}{suffix}")
    } else {
        format!("{value:.0}{suffix}")
    }
}

/// Bytes (or bytes per second) in binary units: `0 B`, `512 B`, `1.5 KiB`, `23 MiB`.
pub(crate) fn bytes(n: f64) -> String {
    if !n.is_finite() || n < 0.0 {
        return "-".to_owned();
    }
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} B")
    } else if value < 10.0 {
        format!("{value:.1} {}", UNITS[unit])
    } else {
        format!("{value:.0} {}", UNITS[unit])
    }
}

/// Seconds of a latency: `0.5ms`, `12ms`, `1.2s`; `-` for none.
pub(crate) fn latency(seconds: Option<f64>) -> String {
    match seconds {
        None => "-".to_owned(),
        Some(s) if s < 0.01 => {
            let ms = s * 1000.0;
            if ms.fract() == 0.0 {
                format!("{ms:.0}ms")
            } else {
                format!("{ms:.1}ms")
            }
        }
        Some(s) if s < 1.0 => format!("{:.0}ms", s * 1000.0),
        Some(s) => format!("{s:.1}s"),
    }
}

/// An uptime: `42s`, `7m12s`, `3h12m`, `5d4h`.
pub(crate) fn uptime(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

/// A weight as written: `2`, `1.5`, `0.333`.
pub(crate) fn weight(w: f64) -> String {
    let text = format!("{w:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_stay_short() {
        assert_eq!(count(0.0), "0");
        assert_eq!(count(950.0), "950");
        assert_eq!(count(2.5), "2.5");
        assert_eq!(count(1234.0), "1.2k");
        assert_eq!(count(34_567.0), "35k");
        assert_eq!(count(5_600_000.0), "5.6M");
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(1536.0), "1.5 KiB");
        assert_eq!(bytes(23.0 * 1024.0 * 1024.0), "23 MiB");
        assert_eq!(latency(Some(0.0005)), "0.5ms");
        assert_eq!(latency(Some(0.005)), "5ms");
        assert_eq!(latency(Some(0.25)), "250ms");
        assert_eq!(latency(Some(2.5)), "2.5s");
        assert_eq!(latency(None), "-");
        assert_eq!(uptime(42.9), "42s");
        assert_eq!(uptime(432.0), "7m12s");
        assert_eq!(uptime(11_520.0), "3h12m");
        assert_eq!(uptime(446_400.0), "5d4h");
        assert_eq!(weight(2.0), "2");
        assert_eq!(weight(1.5), "1.5");
        assert_eq!(weight(1.0 / 3.0), "0.333");
        assert_eq!(weight(0.0), "0");
    }
}
