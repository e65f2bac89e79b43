//! Unit tests of redaction.

use super::*;
use crate::desktop::review::tests::secrets;
use serde_json::json;

#[test]
fn redact_value_hides_secrets_in_text_nested_fields_and_keys() {
    let r = secrets();
    let mut v = json!({
        "kind": "type_text",
        "text": "my password is hunter22!",
        "long": "hunter22-and-more, hunter22",
        "deep": [{"receipt": {"echo": "token xx-tok-1234-yy and tok-1234"}}],
        "hunter22": 1,
        "code": "123"
    });
    r.redact_value(&mut v);
    assert_eq!(v["text"], "my password is [secret:DB_PASSWORD]!");
    assert_eq!(v["long"], "[secret:LONG_PW], [secret:DB_PASSWORD]");
    assert_eq!(
        v["deep"][0]["receipt"]["echo"],
        "token [secret:API_TOKEN] and [secret:SHORTER]"
    );
    assert_eq!(v["[secret:DB_PASSWORD]"], 1);
    assert_eq!(v["code"], "123", "values under 4 bytes are not secrets");
    assert!(format!("{r:?}").contains("DB_PASSWORD"));
    assert!(!format!("{r:?}").contains("hunter22"), "Debug shows values");
}

#[test]
fn redact_value_drops_the_text_of_typed_secrets() {
    let mut v = json!({"kind": "type_text", "secret": "UNKNOWN_TO_REDACTOR", "text": "s3cr3t"});
    Redactor::none().redact_value(&mut v);
    assert_eq!(
        v,
        json!({"kind": "type_text", "secret": "UNKNOWN_TO_REDACTOR"})
    );
    // Without a secret name, the text stays.
    let mut v = json!({"type": "type_text", "text": "hello"});
    Redactor::none().redact_value(&mut v);
    assert_eq!(v["text"], "hello");
}

#[test]
fn redact_str_never_leaves_part_of_a_non_utf8_secret() {
    let r = Redactor::new(vec![("BIN".into(), vec![0xa9, b'a', b'b', b'c'])]);
    // "é" is c3 a9: the secret starts inside it.
    let out = r.redact_str("xéabcx").unwrap();
    assert_eq!(out, "x\u{fffd}[secret:BIN]x");
}
