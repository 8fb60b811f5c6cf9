use super::*;
use crate::core::access::Access;
use base64::Engine as _;
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::json;

const NOW: u64 = 1_700_000_000;
const SECRET: &str = "a-shared-secret";

fn settings(key: KeySource) -> JwtSettings {
    JwtSettings {
        key,
        from: TokenField::Password,
        verify_claims: BTreeMap::new(),
        acl_claim_name: "acl".into(),
    }
}

fn hmac() -> Jwt {
    Jwt::load(&settings(KeySource::Secret {
        secret: SECRET.into(),
        base64: false,
    }))
    .unwrap()
}

fn hs256(claims: &Value, secret: &str) -> String {
    encode(
        &Header::default(),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn creds<'a>(username: Option<&'a str>, password: Option<&'a [u8]>) -> Credentials<'a> {
    Credentials {
        client_id: "car1",
        username,
        password,
        peer: "192.0.2.7:1".parse().unwrap(),
        certified: false,
        listener: "tcp:default",
        now_unix: NOW,
    }
}

fn decide(jwt: &Jwt, token: &str) -> Verdict {
    jwt.decide_now(&creds(Some("u"), Some(token.as_bytes())))
}

#[test]
fn a_valid_token_is_allowed() {
    let token = hs256(&json!({"exp": NOW + 60, "nbf": NOW - 1}), SECRET);
    assert_eq!(decide(&hmac(), &token), Verdict::Allow(Grant::default()));
    // Without exp or nbf too (EMQX requires neither).
    assert_eq!(
        decide(&hmac(), &hs256(&json!({"sub": "x"}), SECRET)),
        Verdict::Allow(Grant::default())
    );
}

#[test]
fn expired_and_not_yet_valid_tokens_are_denied() {
    let expired = hs256(&json!({"exp": NOW}), SECRET);
    assert_eq!(
        decide(&hmac(), &expired),
        Verdict::Deny(Refusal::BadCredentials)
    );
    let early = hs256(&json!({"exp": NOW + 60, "nbf": NOW + 30}), SECRET);
    assert_eq!(
        decide(&hmac(), &early),
        Verdict::Deny(Refusal::BadCredentials)
    );
    let garbage = hs256(&json!({"exp": "tomorrow"}), SECRET);
    assert_eq!(
        decide(&hmac(), &garbage),
        Verdict::Deny(Refusal::BadCredentials)
    );
}

#[test]
fn tokens_we_did_not_sign_are_passed_on() {
    let jwt = hmac();
    // Another key.
    let other = hs256(&json!({"exp": NOW + 60}), "another-secret");
    assert_eq!(decide(&jwt, &other), Verdict::Ignore);
    // `alg: none`, unsigned.
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&json!({"exp": NOW + 60}))
    );
    assert_eq!(decide(&jwt, &none), Verdict::Ignore);
    // A signed token whose signature was cut, a password, nothing at all.
    let token = hs256(&json!({"exp": NOW + 60}), SECRET);
    let cut = &token[..token.rfind('.').unwrap() + 1];
    assert_eq!(decide(&jwt, cut), Verdict::Ignore);
    assert_eq!(decide(&jwt, "hunter2"), Verdict::Ignore);
    assert_eq!(jwt.decide_now(&creds(Some("u"), None)), Verdict::Ignore);
    assert_eq!(
        jwt.decide_now(&creds(Some("u"), Some(&[0xff, 0xfe]))),
        Verdict::Ignore
    );
}

#[test]
fn an_hmac_token_is_not_checked_against_a_public_key() {
    // The classic confusion: HS256 signed with the public key's PEM text.
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let public = pair.public_key_pem();
    let jwt = Jwt::load(&settings(KeySource::PublicKey(public.clone()))).unwrap();
    let forged = hs256(&json!({"exp": NOW + 60}), &public);
    assert_eq!(decide(&jwt, &forged), Verdict::Ignore);
}

#[test]
fn es256_with_a_public_key_or_a_jwks_file() {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let signing = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
    let mut header = Header::new(Algorithm::ES256);
    let claims = json!({"exp": NOW + 60});
    let token = encode(&header, &claims, &signing).unwrap();

    let jwt = Jwt::load(&settings(KeySource::PublicKey(pair.public_key_pem()))).unwrap();
    assert_eq!(decide(&jwt, &token), Verdict::Allow(Grant::default()));
    assert_eq!(decide(&hmac(), &token), Verdict::Ignore);

    // The same key in a JWKS file, found by `kid`.
    let raw = pair.public_key_raw();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwks = json!({"keys": [
        {"kty": "oct", "kid": "other", "k": b64(b"zzz")},
        {"kty": "EC", "crv": "P-256", "kid": "k1", "x": b64(&raw[1..33]), "y": b64(&raw[33..65])},
    ]});
    let path = std::env::temp_dir().join(format!("petrel-jwks-{}.json", std::process::id()));
    std::fs::write(&path, jwks.to_string()).unwrap();
    let jwt = Jwt::load(&settings(KeySource::JwksFile(path.clone()))).unwrap();
    header.kid = Some("k1".into());
    let with_kid = encode(&header, &claims, &signing).unwrap();
    assert_eq!(decide(&jwt, &with_kid), Verdict::Allow(Grant::default()));
    // Without `kid`, every key of the family is tried.
    assert_eq!(decide(&jwt, &token), Verdict::Allow(Grant::default()));
    header.kid = Some("unknown".into());
    let unknown = encode(&header, &claims, &signing).unwrap();
    assert_eq!(decide(&jwt, &unknown), Verdict::Ignore);
    std::fs::remove_file(path).unwrap();
}

#[test]
fn the_token_may_come_in_the_username() {
    let mut s = settings(KeySource::Secret {
        secret: base64::engine::general_purpose::STANDARD.encode(SECRET),
        base64: true,
    });
    s.from = TokenField::Username;
    let jwt = Jwt::load(&s).unwrap();
    let token = hs256(&json!({"exp": NOW + 60}), SECRET);
    assert_eq!(
        jwt.decide_now(&creds(Some(&token), None)),
        Verdict::Allow(Grant::default())
    );
    assert_eq!(
        jwt.decide_now(&creds(Some("u"), Some(token.as_bytes()))),
        Verdict::Ignore
    );
}

#[test]
fn verify_claims_must_match_with_placeholders_filled_in() {
    let mut s = settings(KeySource::Secret {
        secret: SECRET.into(),
        base64: false,
    });
    s.verify_claims = [
        ("clientid".to_owned(), "${clientid}".to_owned()),
        ("tier".to_owned(), "2".to_owned()),
    ]
    .into();
    let jwt = Jwt::load(&s).unwrap();
    let good = hs256(&json!({"clientid": "car1", "tier": 2}), SECRET);
    assert_eq!(decide(&jwt, &good), Verdict::Allow(Grant::default()));
    for bad in [
        json!({"clientid": "car2", "tier": 2}),
        json!({"tier": 2}),
        json!({"clientid": "car1", "tier": "3"}),
    ] {
        let token = hs256(&bad, SECRET);
        assert_eq!(
            decide(&jwt, &token),
            Verdict::Deny(Refusal::BadCredentials),
            "{bad}"
        );
    }
}

#[test]
fn the_acl_claim_comes_with_the_grant() {
    let token = hs256(
        &json!({"exp": NOW + 60, "acl": {"pub": ["up/${clientid}"], "sub": ["down/#"]}}),
        SECRET,
    );
    let Verdict::Allow(grant) = decide(&hmac(), &token) else {
        panic!("allowed");
    };
    let acl = grant.acl.expect("the claim's rules");
    assert_eq!(acl.decide(Access::Publish, "up/car1"), Some(true));
    assert_eq!(acl.decide(Access::Publish, "up/car2"), Some(false));
    assert_eq!(acl.decide(Access::Subscribe, "down/x"), Some(true));
    assert!(!grant.superuser);
    // A malformed claim refuses the token rather than grant everything.
    let bad = hs256(&json!({"acl": {"pub": "up/#"}}), SECRET);
    assert_eq!(
        decide(&hmac(), &bad),
        Verdict::Deny(Refusal::BadCredentials)
    );
    let superuser = hs256(&json!({"is_superuser": true}), SECRET);
    let Verdict::Allow(grant) = decide(&hmac(), &superuser) else {
        panic!("allowed");
    };
    assert!(grant.superuser);
}

#[test]
fn bad_keys_are_load_errors_naming_the_setting() {
    let err = Jwt::load(&settings(KeySource::PublicKey(
        "-----BEGIN PUBLIC KEY-----\nxx\n-----END PUBLIC KEY-----\n".into(),
    )))
    .unwrap_err();
    assert!(err.starts_with("public_key:"), "{err}");
    let err = Jwt::load(&settings(KeySource::PublicKey(
        "/nonexistent/key.pem".into(),
    )))
    .unwrap_err();
    assert!(err.contains("/nonexistent/key.pem"), "{err}");
    let err = Jwt::load(&settings(KeySource::Secret {
        secret: "not base64!".into(),
        base64: true,
    }))
    .unwrap_err();
    assert!(err.contains("secret_base64_encoded"), "{err}");
    let err = Jwt::load(&settings(KeySource::JwksFile("/nonexistent/jwks".into()))).unwrap_err();
    assert!(err.contains("jwks_file"), "{err}");
}
