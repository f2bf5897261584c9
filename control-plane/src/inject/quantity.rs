//! Kubernetes resource quantities (`100m`, `0.5`, `64Mi`, `1e3`): the
//! grammar of `k8s.io/apimachinery/pkg/api/resource`, and their value so
//! that a request can be compared with a limit.
//!
//! Negative quantities are refused: none makes sense for a container's
//! resources.

/// The value of `s` in base units (cores, bytes), or `None` when it is not
/// a non-negative Kubernetes quantity.
pub fn parse(s: &str) -> Option<f64> {
    let s = s.strip_prefix('+').unwrap_or(s);
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let mantissa = parse_number(number)?;
    Some(mantissa * multiplier(suffix)?)
}

/// `1`, `1.5`, `1.`, `.5`; not `.` or `1.2.3`.
fn parse_number(s: &str) -> Option<f64> {
    let (whole, fraction) = s.split_once('.').unwrap_or((s, ""));
    let digits = |p: &str| p.chars().all(|c| c.is_ascii_digit());
    if whole.is_empty() && fraction.is_empty() || !digits(whole) || !digits(fraction) {
        return None;
    }
    s.parse().ok()
}

fn multiplier(suffix: &str) -> Option<f64> {
    const BINARY: [(&str, i32); 6] = [
        ("Ki", 10),
        ("Mi", 20),
        ("Gi", 30),
        ("Ti", 40),
        ("Pi", 50),
        ("Ei", 60),
    ];
    const DECIMAL: [(&str, i32); 10] = [
        ("n", -9),
        ("u", -6),
        ("m", -3),
        ("", 0),
        ("k", 3),
        ("M", 6),
        ("G", 9),
        ("T", 12),
        ("P", 15),
        ("E", 18),
    ];
    if let Some((_, p)) = BINARY.iter().find(|(s, _)| *s == suffix) {
        return Some(2f64.powi(*p));
    }
    if let Some((_, p)) = DECIMAL.iter().find(|(s, _)| *s == suffix) {
        return Some(10f64.powi(*p));
    }
    let exponent = suffix.strip_prefix(['e', 'E'])?;
    let digits = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some(10f64.powi(exponent.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_follow_the_kubernetes_grammar() {
        for (s, value) in [
            ("100m", 0.1),
            ("0.5", 0.5),
            ("2", 2.0),
            ("64Mi", 64.0 * 1024.0 * 1024.0),
            ("1Gi", 1024.0 * 1024.0 * 1024.0),
            ("1e3", 1000.0),
            ("1E-3", 0.001),
            ("1.5k", 1500.0),
            (".5", 0.5),
            ("+1", 1.0),
            ("128M", 128e6),
        ] {
            assert_eq!(parse(s), Some(value), "{s}");
        }
        for s in [
            "", "abc", "-1", "1.2.3", ".", "1mi", "1 Mi", "1e", "Mi", "1KiB", "1e1.5",
        ] {
            assert_eq!(parse(s), None, "{s}");
        }
    }
}
