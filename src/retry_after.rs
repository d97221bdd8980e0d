//! `Retry-After` (RFC 9110 section 10.2.3): delta-seconds or an HTTP-date.
//!
//! Read from the network, so it never panics: anything unreadable is `None`, and the caller
//! falls back to its own backoff. A date in the past means "now" (zero wait).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderValue;

/// The wait a `Retry-After` value asks for, measured from `now`.
pub(crate) fn parse(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        // Delta-seconds; more digits than a u64 holds is "a very long time".
        return Some(Duration::from_secs(text.parse().unwrap_or(u64::MAX)));
    }
    let at = http_date(text)?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Parse the three HTTP-date forms: IMF-fixdate, RFC 850 and asctime.
fn http_date(text: &str) -> Option<SystemTime> {
    let fields: Vec<&str> = text.split_ascii_whitespace().collect();
    let (day, month, year, time) = match fields.as_slice() {
        // Sun, 06 Nov 1994 08:49:37 GMT
        [_weekday, day, month, year, time, "GMT"] => (*day, *month, year.parse().ok()?, *time),
        // Sunday, 06-Nov-94 08:49:37 GMT
        [_weekday, date, time, "GMT"] => {
            let mut parts = date.split('-');
            let (day, month, year) = (parts.next()?, parts.next()?, parts.next()?);
            let year: i64 = year.parse().ok()?;
            // RFC 9110: a two-digit year more than 50 years ahead is in the past century.
            let year = if year < 100 {
                if year + 2000 > current_year() + 50 {
                    year + 1900
                } else {
                    year + 2000
                }
            } else {
                year
            };
            (day, month, year, *time)
        }
        // Sun Nov  6 08:49:37 1994
        [_weekday, month, day, time, year] => (*day, *month, year.parse().ok()?, *time),
        _ => return None,
    };
    let day: u32 = day.parse().ok()?;
    let month = month_number(month)?;
    let mut clock = time.split(':');
    let hour: u32 = clock.next()?.parse().ok()?;
    let minute: u32 = clock.next()?.parse().ok()?;
    let second: u32 = clock.next()?.parse().ok()?;
    if clock.next().is_some()
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
        || !(1970..=9999).contains(&year)
    {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + i64::from(hour * 3600 + minute * 60 + second);
    UNIX_EPOCH.checked_add(Duration::from_secs(u64::try_from(seconds).ok()?))
}

fn month_number(name: &str) -> Option<u32> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    MONTHS
        .iter()
        .position(|month| *month == name)
        .map(|i| i as u32 + 1)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month = i64::from(month);
    let day_of_year =
        (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

fn current_year() -> i64 {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    1970 + (seconds / 31_556_952) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(seconds)
    }

    fn header(value: &str) -> HeaderValue {
        HeaderValue::from_str(value).unwrap()
    }

    // 784111777 is Sun, 06 Nov 1994 08:49:37 GMT.
    const RFC_EXAMPLE: u64 = 784_111_777;

    #[test]
    fn delta_seconds() {
        assert_eq!(parse(&header("120"), at(0)), Some(Duration::from_secs(120)));
        assert_eq!(parse(&header(" 0 "), at(0)), Some(Duration::ZERO));
        assert_eq!(
            parse(&header("99999999999999999999999"), at(0)),
            Some(Duration::from_secs(u64::MAX))
        );
    }

    #[test]
    fn all_three_date_forms() {
        let now = at(RFC_EXAMPLE - 30);
        for form in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
        ] {
            assert_eq!(
                parse(&header(form), now),
                Some(Duration::from_secs(30)),
                "{form}"
            );
        }
    }

    #[test]
    fn past_date_means_now() {
        assert_eq!(
            parse(
                &header("Sun, 06 Nov 1994 08:49:37 GMT"),
                at(RFC_EXAMPLE + 100)
            ),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn garbage_is_none_never_a_panic() {
        for garbage in [
            "",
            "-5",
            "1.5",
            "soon",
            "Sun, 32 Nov 1994 08:49:37 GMT",
            "Sun, 06 Foo 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 25:49:37 GMT",
            "Sun, 06 Nov 99999999999 08:49:37 GMT",
            "Sun, 06 Nov 1994 08:49 GMT",
            "Sun, 06 Nov 1994 08:49:37 PST",
        ] {
            assert_eq!(parse(&header(garbage), at(0)), None, "{garbage:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_any_header(value in "\\PC{0,80}") {
            if let Ok(header) = HeaderValue::from_str(&value) {
                let _ = parse(&header, at(RFC_EXAMPLE));
            }
        }

        #[test]
        fn delta_seconds_round_trip(seconds in 0u64..=u64::MAX) {
            let parsed = parse(&header(&seconds.to_string()), at(0));
            proptest::prop_assert_eq!(parsed, Some(Duration::from_secs(seconds)));
        }

        #[test]
        fn imf_fixdate_round_trips(offset in 0u64..(200 * 365 * 86_400)) {
            let moment = RFC_EXAMPLE + offset;
            let days = (moment / 86_400) as i64;
            let (year, month, day) = civil_from_days(days);
            let clock = moment % 86_400;
            const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
            let text = format!(
                "Mon, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
                MONTHS[(month - 1) as usize],
                clock / 3600,
                clock / 60 % 60,
                clock % 60
            );
            proptest::prop_assert_eq!(parse(&header(&text), at(RFC_EXAMPLE)), Some(Duration::from_secs(offset)));
        }
    }

    /// The inverse of `days_from_civil`, for generating dates.
    fn civil_from_days(days: i64) -> (i64, u32, u32) {
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        (year, month, day)
    }

    #[test]
    fn days_from_civil_matches_known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(
            days_from_civil(1994, 11, 6) * 86_400 + 8 * 3600 + 49 * 60 + 37,
            RFC_EXAMPLE as i64
        );
    }
}
