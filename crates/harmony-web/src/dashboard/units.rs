//! How numbers, sizes, durations and times read on the dashboard, and HTML escaping for the
//! few fragments built outside templates (charts).

use harmonydb::Timestamp;

/// `s` with `& < > " '` escaped for HTML text and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A duration in ms for humans: `340 ms`, `4.2 s`, `3 min 5 s`, `2 h 10 min`, `3 d 4 h`.
pub fn duration_ms(ms: i64) -> String {
    let ms = ms.max(0);
    if ms < 1_000 {
        return format!("{ms} ms");
    }
    let s = ms / 1_000;
    if s < 60 {
        return format!("{:.1} s", ms as f64 / 1000.0);
    }
    if s < 3_600 {
        return format!("{} min {} s", s / 60, s % 60);
    }
    if s < 86_400 {
        return format!("{} h {} min", s / 3_600, (s % 3_600) / 60);
    }
    format!("{} d {} h", s / 86_400, (s % 86_400) / 3_600)
}

/// How long before `now` `t` was: `3.1 s ago`.
pub fn ago(now: Timestamp, t: Timestamp) -> String {
    format!("{} ago", duration_ms(now.as_millis() - t.as_millis()))
}

/// A time as `2026-12-04 19:52:01` (UTC).
pub fn when(t: Timestamp) -> String {
    t.to_chrono().format("%Y-%m-%d %H:%M:%S").to_string()
}

/// Bytes as `512 MiB`, `4 GiB`, `1.5 TiB`.
pub fn bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n.max(0.0);
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if v.fract() == 0.0 || v >= 100.0 {
        format!("{v:.0} {}", UNITS[i])
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// A CPU or GPU amount: `4`, `0.5`.
pub fn units(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_owned()
    }
}

/// `part` of `whole` in whole percent, 0 when `whole` is not positive.
pub fn percent(part: f64, whole: f64) -> u32 {
    if whole <= 0.0 {
        0
    } else {
        ((part / whole) * 100.0).clamp(0.0, 100.0).round() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readable_units() {
        assert_eq!(
            escape(r#"<a href="x">&'"#),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert_eq!(duration_ms(340), "340 ms");
        assert_eq!(duration_ms(4_200), "4.2 s");
        assert_eq!(duration_ms(185_000), "3 min 5 s");
        assert_eq!(bytes(4.0 * 1024.0 * 1024.0 * 1024.0), "4 GiB");
        assert_eq!(bytes(1536.0), "1.5 KiB");
        assert_eq!(units(0.5), "0.5");
        assert_eq!(units(4.0), "4");
        assert_eq!(percent(1.0, 4.0), 25);
        assert_eq!(percent(1.0, 0.0), 0);
    }
}
