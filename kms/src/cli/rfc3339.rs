//! RFC 3339 times for the command line (`--since 2026-01-31T12:00:00Z`) and for
//! output, converted to and from `google.protobuf.Timestamp` by hand: the civil
//! calendar arithmetic is Howard Hinnant's `days_from_civil` / `civil_from_days`
//! (proleptic Gregorian, exact for every year in range).

use prost_types::Timestamp;

const SECONDS_PER_DAY: i64 = 86_400;

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)` (a `t` or space may separate
/// date and time; `z` is accepted), or a bare date `YYYY-MM-DD` meaning midnight
/// UTC. Fractions finer than nanoseconds are truncated.
pub(crate) fn parse(text: &str) -> Result<Timestamp, String> {
    parse_inner(text.trim()).ok_or_else(|| {
        format!("invalid time {text:?}: expected RFC 3339, e.g. 2026-01-31T12:00:00Z or 2026-01-31")
    })
}

fn parse_inner(text: &str) -> Option<Timestamp> {
    let b = text.as_bytes();
    let year = digits(b, 0, 4)?;
    expect(b, 4, b'-')?;
    let month = digits(b, 5, 2)?;
    expect(b, 7, b'-')?;
    let day = digits(b, 8, 2)?;
    if !(1..=12).contains(&month) || !(1..=days_in_month(year, month)).contains(&day) {
        return None;
    }
    let days = days_from_civil(year, month, day);
    if b.len() == 10 {
        return Some(Timestamp {
            seconds: days * SECONDS_PER_DAY,
            nanos: 0,
        });
    }
    if !matches!(b.get(10), Some(b'T' | b't' | b' ')) {
        return None;
    }
    let hour = digits(b, 11, 2)?;
    expect(b, 13, b':')?;
    let minute = digits(b, 14, 2)?;
    expect(b, 16, b':')?;
    // 60 is a leap second; like POSIX time, it counts as the next minute's first.
    let second = digits(b, 17, 2)?;
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut pos = 19;
    let mut nanos: i64 = 0;
    if b.get(pos) == Some(&b'.') {
        pos += 1;
        let start = pos;
        while b.get(pos).is_some_and(u8::is_ascii_digit) {
            if pos - start < 9 {
                nanos = nanos * 10 + i64::from(b[pos] - b'0');
            }
            pos += 1;
        }
        if pos == start {
            return None;
        }
        for _ in (pos - start)..9 {
            nanos *= 10;
        }
    }
    let offset = match b.get(pos)? {
        b'Z' | b'z' if pos + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if pos + 6 == b.len() => {
            let hours = digits(b, pos + 1, 2)?;
            expect(b, pos + 3, b':')?;
            let minutes = digits(b, pos + 4, 2)?;
            if hours > 23 || minutes > 59 {
                return None;
            }
            let offset = hours * 3_600 + minutes * 60;
            if *sign == b'-' { -offset } else { offset }
        }
        _ => return None,
    };
    let seconds = days * SECONDS_PER_DAY + hour * 3_600 + minute * 60 + second - offset;
    Some(Timestamp {
        seconds,
        nanos: i32::try_from(nanos).ok()?,
    })
}

/// `n` ASCII digits at `start` as a number.
fn digits(b: &[u8], start: usize, n: usize) -> Option<i64> {
    let slice = b.get(start..start + n)?;
    slice.iter().try_fold(0i64, |acc, &d| {
        d.is_ascii_digit().then(|| acc * 10 + i64::from(d - b'0'))
    })
}

fn expect(b: &[u8], pos: usize, byte: u8) -> Option<()> {
    (b.get(pos) == Some(&byte)).then_some(())
}

fn is_leap_year(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap_year(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12; // March = 0
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The proleptic Gregorian date `days` after 1970-01-01.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn format_parts(time: &Timestamp, with_fraction: bool) -> String {
    let time = time.normalized();
    let days = time.seconds.div_euclid(SECONDS_PER_DAY);
    let secs = time.seconds.rem_euclid(SECONDS_PER_DAY);
    let (year, month, day) = civil_from_days(days);
    let mut text = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        secs / 3_600,
        secs % 3_600 / 60,
        secs % 60
    );
    if with_fraction && time.nanos > 0 {
        let fraction = format!("{:09}", time.nanos);
        text.push('.');
        text.push_str(fraction.trim_end_matches('0'));
    }
    text.push('Z');
    text
}

/// Full precision, UTC: `2026-01-31T12:00:00.123456Z` (no fraction when zero).
pub(crate) fn format(time: &Timestamp) -> String {
    format_parts(time, true)
}

/// Whole seconds, UTC: `2026-01-31T12:00:00Z`.
pub(crate) fn format_seconds(time: &Timestamp) -> String {
    format_parts(time, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(seconds: i64, nanos: i32) -> Timestamp {
        Timestamp { seconds, nanos }
    }

    #[test]
    fn parses_utc_times_and_dates() {
        assert_eq!(parse("1970-01-01T00:00:00Z"), Ok(ts(0, 0)));
        assert_eq!(parse("2026-01-01T00:00:00Z"), Ok(ts(1_767_225_600, 0)));
        assert_eq!(parse("2026-01-01"), Ok(ts(1_767_225_600, 0)));
        assert_eq!(parse("2000-02-29t23:59:59z"), Ok(ts(951_868_799, 0)));
        assert_eq!(parse("2038-01-19 03:14:08Z"), Ok(ts(2_147_483_648, 0)));
        assert_eq!(parse("1969-12-31T23:59:59Z"), Ok(ts(-1, 0)));
    }

    #[test]
    fn parses_fractions_and_offsets() {
        assert_eq!(parse("1970-01-01T00:00:00.5Z"), Ok(ts(0, 500_000_000)));
        assert_eq!(parse("1970-01-01T00:00:00.000000001Z"), Ok(ts(0, 1)));
        assert_eq!(
            parse("1970-01-01T00:00:00.1234567899Z"),
            Ok(ts(0, 123_456_789))
        );
        assert_eq!(parse("1970-01-01T02:00:00+02:00"), Ok(ts(0, 0)));
        assert_eq!(parse("1969-12-31T19:30:00-04:30"), Ok(ts(0, 0)));
        // A leap second counts as the first second of the next minute.
        assert_eq!(parse("1972-06-30T23:59:60Z"), parse("1972-07-01T00:00:00Z"));
    }

    #[test]
    fn rejects_malformed_times() {
        for bad in [
            "",
            "yesterday",
            "2026-1-01",
            "2026-13-01",
            "2026-00-10",
            "2026-02-29",
            "1900-02-29",
            "2026-04-31",
            "2026-01-01T",
            "2026-01-01T24:00:00Z",
            "2026-01-01T12:60:00Z",
            "2026-01-01T12:00:61Z",
            "2026-01-01T12:00:00",
            "2026-01-01T12:00:00.Z",
            "2026-01-01T12:00:00+2:00",
            "2026-01-01T12:00:00+02:00x",
            "2026-01-01T12:00:00Zx",
            "2026-01-01X12:00:00Z",
            "+026-01-01",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn formats_utc_with_and_without_fraction() {
        assert_eq!(format(&ts(0, 0)), "1970-01-01T00:00:00Z");
        assert_eq!(
            format(&ts(1_767_225_600, 123_000_000)),
            "2026-01-01T00:00:00.123Z"
        );
        assert_eq!(
            format(&ts(1_767_225_600, 1)),
            "2026-01-01T00:00:00.000000001Z"
        );
        assert_eq!(
            format_seconds(&ts(1_767_225_600, 999_999_999)),
            "2026-01-01T00:00:00Z"
        );
        assert_eq!(format(&ts(-1, 0)), "1969-12-31T23:59:59Z");
        assert_eq!(format(&ts(951_868_799, 0)), "2000-02-29T23:59:59Z");
    }

    #[test]
    fn calendar_round_trips_every_day_over_several_centuries() {
        // 1600-03-01 .. 2500-03-01 covers leap-year rules of 4, 100 and 400.
        let start = days_from_civil(1600, 3, 1);
        let end = days_from_civil(2500, 3, 1);
        let mut expected = (1600, 3, 1);
        for days in start..end {
            let civil = civil_from_days(days);
            assert_eq!(civil, expected, "day {days}");
            assert_eq!(days_from_civil(civil.0, civil.1, civil.2), days);
            expected = if civil.2 < days_in_month(civil.0, civil.1) {
                (civil.0, civil.1, civil.2 + 1)
            } else if civil.1 < 12 {
                (civil.0, civil.1 + 1, 1)
            } else {
                (civil.0 + 1, 1, 1)
            };
        }
    }

    #[test]
    fn format_and_parse_round_trip() {
        for (seconds, nanos) in [
            (0, 0),
            (1_767_225_600, 5),
            (-86_401, 750_000_000),
            (253_402_300_799, 0),
        ] {
            let time = ts(seconds, nanos);
            assert_eq!(parse(&format(&time)), Ok(time));
        }
    }
}
