//! Just enough X.509 reading for the transports: a certificate's expiry, its subject Common
//! Name and its first DNS Subject Alternative Name.
//!
//! It walks DER and never panics or allocates beyond the strings it returns, whatever the
//! bytes. It does not verify anything: rustls has already verified a peer's certificate
//! before we read it, and our own certificates only need their expiry checked.

use std::time::{Duration, SystemTime};

const TAG_SEQUENCE: u8 = 0x30;
const TAG_SET: u8 = 0x31;
const TAG_OID: u8 = 0x06;
const TAG_BOOLEAN: u8 = 0x01;
const TAG_OCTET_STRING: u8 = 0x04;
const TAG_UTC_TIME: u8 = 0x17;
const TAG_GENERALIZED_TIME: u8 = 0x18;
/// `[0] EXPLICIT Version` in TBSCertificate.
const TAG_VERSION: u8 = 0xA0;
/// `[3] EXPLICIT Extensions` in TBSCertificate.
const TAG_EXTENSIONS: u8 = 0xA3;
/// `dNSName [2] IA5String` in GeneralName.
const TAG_DNS_NAME: u8 = 0x82;

/// id-at-commonName, 2.5.4.3.
const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
/// id-ce-subjectAltName, 2.5.29.17.
const OID_SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1D, 0x11];

/// One tag-length-value, its contents, and what follows it.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7F);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The contents of a TLV that must carry `tag`.
fn expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (found, contents, rest) = tlv(input)?;
    (found == tag).then_some((contents, rest))
}

/// The fields of TBSCertificate we read.
struct Tbs<'a> {
    validity: &'a [u8],
    subject: &'a [u8],
    extensions: Option<&'a [u8]>,
}

fn tbs(cert: &[u8]) -> Option<Tbs<'_>> {
    let (cert, _) = expect(cert, TAG_SEQUENCE)?;
    let (mut rest, _) = expect(cert, TAG_SEQUENCE)?;
    if let Some((TAG_VERSION, _, after)) = tlv(rest) {
        rest = after;
    }
    let (_serial, _, rest) = tlv(rest)?;
    let (_signature, rest) = expect(rest, TAG_SEQUENCE)?;
    let (_issuer, rest) = expect(rest, TAG_SEQUENCE)?;
    let (validity, rest) = expect(rest, TAG_SEQUENCE)?;
    let (subject, mut rest) = expect(rest, TAG_SEQUENCE)?;
    let mut extensions = None;
    while let Some((tag, contents, after)) = tlv(rest) {
        if tag == TAG_EXTENSIONS {
            extensions = Some(expect(contents, TAG_SEQUENCE)?.0);
        }
        rest = after;
    }
    Some(Tbs {
        validity,
        subject,
        extensions,
    })
}

/// When the certificate stops being valid (`notAfter`).
pub fn not_after(cert: &[u8]) -> Option<SystemTime> {
    let tbs = tbs(cert)?;
    let (_, _, rest) = tlv(tbs.validity)?;
    let (tag, time, _) = tlv(rest)?;
    parse_time(tag, time)
}

/// The subject's first Common Name.
pub fn common_name(cert: &[u8]) -> Option<String> {
    let mut names = tbs(cert)?.subject;
    while let Some((set, rest)) = expect(names, TAG_SET) {
        let mut attributes = set;
        while let Some((attribute, after)) = expect(attributes, TAG_SEQUENCE) {
            let (oid, value) = expect(attribute, TAG_OID)?;
            if oid == OID_COMMON_NAME {
                let (_string_type, text, _) = tlv(value)?;
                return String::from_utf8(text.to_vec()).ok();
            }
            attributes = after;
        }
        names = rest;
    }
    None
}

/// The first DNS name in the Subject Alternative Name extension.
pub fn first_dns_name(cert: &[u8]) -> Option<String> {
    let mut extensions = tbs(cert)?.extensions?;
    while let Some((extension, after)) = expect(extensions, TAG_SEQUENCE) {
        let (oid, mut rest) = expect(extension, TAG_OID)?;
        if oid == OID_SUBJECT_ALT_NAME {
            if let Some((TAG_BOOLEAN, _, after_critical)) = tlv(rest) {
                rest = after_critical;
            }
            let (value, _) = expect(rest, TAG_OCTET_STRING)?;
            let (mut names, _) = expect(value, TAG_SEQUENCE)?;
            while let Some((tag, name, after_name)) = tlv(names) {
                if tag == TAG_DNS_NAME {
                    return String::from_utf8(name.to_vec()).ok();
                }
                names = after_name;
            }
            return None;
        }
        extensions = after;
    }
    None
}

/// UTCTime `YYMMDDHHMMSSZ` (years 1950–2049) or GeneralizedTime `YYYYMMDDHHMMSSZ`.
fn parse_time(tag: u8, text: &[u8]) -> Option<SystemTime> {
    let digits = |s: &[u8]| -> Option<i64> {
        s.iter().try_fold(0i64, |acc, &b| {
            b.is_ascii_digit().then(|| acc * 10 + i64::from(b - b'0'))
        })
    };
    let (year, rest) = match tag {
        TAG_UTC_TIME if text.len() == 13 => {
            let yy = digits(&text[..2])?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, &text[2..])
        }
        TAG_GENERALIZED_TIME if text.len() == 15 => (digits(&text[..4])?, &text[4..]),
        _ => return None,
    };
    if rest.last() != Some(&b'Z') {
        return None;
    }
    let field = |i: usize| digits(&rest[i..i + 2]);
    let (month, day) = (field(0)?, field(2)?);
    let (hour, minute, second) = (field(4)?, field(6)?, field(8)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let secs = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second;
    let secs = u64::try_from(secs).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub(crate) fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date (year, month, day) of a number of days since 1970-01-01.
pub(crate) fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month as u8, day as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_round_trip() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        for days in [-1000, 0, 59, 60, 11_016, 20_000, 50_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, i64::from(m), i64::from(d)), days);
        }
    }

    #[test]
    fn times_parse_in_both_encodings() {
        let utc = parse_time(TAG_UTC_TIME, b"491231235959Z").unwrap();
        let generalized = parse_time(TAG_GENERALIZED_TIME, b"20491231235959Z").unwrap();
        assert_eq!(utc, generalized);
        assert!(parse_time(TAG_UTC_TIME, b"991231235959Z").unwrap() < utc);
        assert!(parse_time(TAG_UTC_TIME, b"4912312359xxZ").is_none());
        assert!(parse_time(TAG_UTC_TIME, b"491331235959Z").is_none());
    }

    #[test]
    fn names_and_expiry_come_out_of_an_rcgen_certificate() {
        let mut params = rcgen::CertificateParams::new(vec![
            "device-7.example".to_owned(),
            "127.0.0.1".to_owned(),
        ])
        .unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Petrel");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "sensor-42");
        params.not_after = rcgen::date_time_ymd(2040, 6, 30);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let der = cert.der();
        assert_eq!(common_name(der).as_deref(), Some("sensor-42"));
        assert_eq!(first_dns_name(der).as_deref(), Some("device-7.example"));
        let expected = SystemTime::UNIX_EPOCH
            + Duration::from_secs(days_from_civil(2040, 6, 30) as u64 * 86_400);
        assert_eq!(not_after(der), Some(expected));
    }

    #[test]
    fn garbage_and_truncations_yield_none_without_panicking() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.example".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = cert.der().to_vec();
        for cut in 0..der.len() {
            let _ = (
                common_name(&der[..cut]),
                first_dns_name(&der[..cut]),
                not_after(&der[..cut]),
            );
        }
        assert_eq!(common_name(&[0x30, 0x84, 0xFF, 0xFF, 0xFF, 0xFF]), None);
        assert_eq!(not_after(b"not a certificate"), None);
    }
}
