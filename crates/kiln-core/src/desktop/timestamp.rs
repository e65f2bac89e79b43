//! Timestamps of review recordings: RFC 3339 in UTC with milliseconds
//! (`2026-11-30T14:02:11.250Z`), written and read back without a date crate.
//!
//! Invariants: [`rfc3339_ms`] always writes exactly 24 bytes of that shape (years 1970..=9999);
//! [`parse_rfc3339_ms`] reads exactly that shape and returns the same instant (to the ms).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `t` as RFC 3339 UTC with milliseconds: `2026-11-30T14:02:11.250Z` (times before 1970 as
/// 1970).
pub fn rfc3339_ms(t: SystemTime) -> String {
    let ms = t
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let (days, rem) = ((ms / 86_400_000) as i64, ms % 86_400_000);
    let (y, m, d) = civil_from_days(days);
    let (h, min, s, milli) = (
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000,
    );
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}.{milli:03}Z")
}

/// The time [`rfc3339_ms`] wrote (exactly that shape; `None` otherwise).
pub fn parse_rfc3339_ms(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() != 24
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'.'
        || b[23] != b'Z'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<u64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se, ms) = (num(11..13)?, num(14..16)?, num(17..19)?, num(20..23)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 59 {
        return None;
    }
    let days = days_from_civil(y as i64, mo as u32, d as u32);
    let days = u64::try_from(days).ok()?;
    let total = days * 86_400_000 + h * 3_600_000 + mi * 60_000 + se * 1000 + ms;
    Some(UNIX_EPOCH + Duration::from_millis(total))
}

/// Year, month, day of a day count since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Days since 1970-01-01 of a date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_ms_formats_and_parses_known_instants() {
        assert_eq!(rfc3339_ms(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = UNIX_EPOCH + Duration::from_millis(951_782_400_250);
        assert_eq!(rfc3339_ms(leap), "2000-02-29T00:00:00.250Z");
        assert_eq!(parse_rfc3339_ms("2000-02-29T00:00:00.250Z"), Some(leap));
        let t = UNIX_EPOCH + Duration::from_millis(1_796_051_391_123);
        assert_eq!(rfc3339_ms(t), "2026-11-30T15:09:51.123Z");
        assert_eq!(parse_rfc3339_ms(&rfc3339_ms(t)), Some(t));
        for bad in ["2000-02-29T00:00:00Z", "2000-13-01T00:00:00.000Z", "x"] {
            assert_eq!(parse_rfc3339_ms(bad), None, "{bad}");
        }
    }
}
