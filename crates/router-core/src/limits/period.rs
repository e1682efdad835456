//! Budget and quota periods (UTC): the key of the current period and when it
//! resets. Civil-date arithmetic from days since the epoch (Howard Hinnant's
//! algorithm), so no date crate is needed.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Daily,
    Monthly,
    /// Never resets.
    Total,
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01.
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Days since 1970-01-01 of a civil date.
pub(crate) fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl Period {
    /// The key of the period containing `now`, e.g. `d20261127`, `m202611`, `t`.
    pub fn key(self, now: SystemTime) -> String {
        let days = unix_days(now);
        let (y, m, d) = civil_from_days(days);
        // Written digit by digit: on every admission, `format!` cost ~1,200
        // instructions a key.
        let mut key = String::with_capacity(9);
        match self {
            Period::Daily => {
                key.push('d');
                push_digits(&mut key, y.max(0) as u64, 4);
                push_digits(&mut key, u64::from(m), 2);
                push_digits(&mut key, u64::from(d), 2);
            }
            Period::Monthly => {
                key.push('m');
                push_digits(&mut key, y.max(0) as u64, 4);
                push_digits(&mut key, u64::from(m), 2);
            }
            Period::Total => key.push('t'),
        }
        key
    }

    /// When the period containing `now` ends; `None` for `total`.
    pub fn reset_at(self, now: SystemTime) -> Option<SystemTime> {
        let days = unix_days(now);
        let next = match self {
            Period::Daily => days + 1,
            Period::Monthly => {
                let (y, m, _) = civil_from_days(days);
                if m == 12 { days_from_civil(y + 1, 1, 1) } else { days_from_civil(y, m + 1, 1) }
            }
            Period::Total => return None,
        };
        Some(UNIX_EPOCH + Duration::from_secs(next as u64 * 86_400))
    }

    /// How long keys of the current period must live: to its end plus a day.
    pub fn ttl_secs(self, now: SystemTime) -> Option<u64> {
        self.reset_at(now).map(|at| at.duration_since(now).unwrap_or_default().as_secs() + 86_400)
    }
}

/// `n` in decimal, zero-padded to `width` digits (as `{n:0width$}`).
fn push_digits(s: &mut String, n: u64, width: u32) {
    let width = width.max(n.checked_ilog10().unwrap_or(0) + 1);
    for i in (0..width).rev() {
        s.push(char::from(b'0' + (n / 10u64.pow(i) % 10) as u8));
    }
}

fn unix_days(t: SystemTime) -> i64 {
    (t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() / 86_400) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn keys_and_resets() {
        // 2026-11-27T14:00:00Z
        let now = at(1_795_788_000);
        assert_eq!(Period::Daily.key(now), "d20261127");
        assert_eq!(Period::Monthly.key(now), "m202611");
        assert_eq!(Period::Total.key(now), "t");
        assert_eq!(Period::Daily.reset_at(now), Some(at(1_795_824_000)));
        // 2026-12-01T00:00:00Z
        assert_eq!(Period::Monthly.reset_at(now), Some(at(1_796_083_200)));
        assert_eq!(Period::Total.reset_at(now), None);
        // December rolls into January.
        let dec = at(1_798_675_200); // 2026-12-31
        assert_eq!(Period::Monthly.key(dec), "m202612");
        assert_eq!(Period::Monthly.reset_at(dec), Some(at(1_798_761_600))); // 2027-01-01
    }

    /// The next (year, month, day), by the Gregorian rules written plainly.
    fn next_date((y, m, d): (i64, u32, u32)) -> (i64, u32, u32) {
        let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        let len = match m {
            2 if leap => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        match (d < len, m < 12) {
            (true, _) => (y, m, d + 1),
            (false, true) => (y, m + 1, 1),
            (false, false) => (y + 1, 1, 1),
        }
    }

    #[test]
    fn every_day_from_1600_to_2800_follows_the_calendar() {
        // 1600-01-01 is day -135,140; walk 1,200 years, both directions.
        let mut days = -135_140;
        let mut date = (1600, 1, 1);
        assert_eq!(civil_from_days(days), date);
        while date.0 < 2800 {
            assert_eq!(days_from_civil(date.0, date.1, date.2), days, "{date:?}");
            days += 1;
            date = next_date(date);
            assert_eq!(civil_from_days(days), date, "day {days}");
        }
    }

    proptest::proptest! {
        #[test]
        fn keys_are_the_date_zero_padded(secs in 0u64..400_000_000_000) {
            let now = at(secs);
            let (y, m, d) = civil_from_days(unix_days(now));
            proptest::prop_assert_eq!(Period::Daily.key(now), format!("d{y:04}{m:02}{d:02}"));
            proptest::prop_assert_eq!(Period::Monthly.key(now), format!("m{y:04}{m:02}"));
        }
    }

    #[test]
    fn periods_change_at_midnight_utc_and_live_a_day_past_their_end() {
        // 2024-02-29T23:59:59Z, a leap day, and the second after it.
        let last = at(1_709_251_199);
        let next = at(1_709_251_200);
        assert_eq!(Period::Daily.key(last), "d20240229");
        assert_eq!(Period::Daily.key(next), "d20240301");
        assert_eq!(Period::Monthly.key(last), "m202402");
        assert_eq!(Period::Monthly.key(next), "m202403");
        assert_eq!(Period::Daily.reset_at(last), Some(next));
        assert_eq!(Period::Monthly.reset_at(last), Some(next));
        // A day's key lives to the end of the day plus a day.
        assert_eq!(Period::Daily.ttl_secs(last), Some(1 + 86_400));
        assert_eq!(Period::Daily.ttl_secs(next), Some(2 * 86_400));
        // 2024-03-01 to 2024-04-01 is 31 days.
        assert_eq!(Period::Monthly.ttl_secs(next), Some(31 * 86_400 + 86_400));
        assert_eq!(Period::Total.ttl_secs(next), None);
        assert_eq!(Period::Total.key(next), "t");
    }

    #[test]
    fn civil_round_trip() {
        for days in [-1000, 0, 59, 60, 365, 11_016, 20_419, 30_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
    }
}
