//! Tests of constraint and preference parsing, display, matching and encoding.

use super::*;

fn c(text: &str) -> Constraint {
    text.parse()
        .unwrap_or_else(|e| panic!("{text:?} should parse: {e}"))
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn parses_every_form() {
    let eq = Constraint {
        key: "disk".into(),
        op: Op::Eq("ssd".into()),
    };
    assert_eq!(c("disk=ssd"), eq);
    assert_eq!(c("  disk =  ssd "), eq);
    assert_eq!(c("disk==ssd"), eq);
    assert_eq!(
        c("disk != ssd"),
        Constraint {
            key: "disk".into(),
            op: Op::Ne("ssd".into())
        }
    );
    let zones = Constraint {
        key: "zone".into(),
        op: Op::In(vec!["a".into(), "b".into(), "c".into()]),
    };
    assert_eq!(c("zone in a,b,c"), zones);
    assert_eq!(c("zone in (a, b ,c)"), zones);
    assert_eq!(c("zone   in(a,b,c)"), zones);
    assert_eq!(
        c("gpu"),
        Constraint {
            key: "gpu".into(),
            op: Op::Exists
        }
    );
    assert_eq!(
        c(" ! gpu "),
        Constraint {
            key: "gpu".into(),
            op: Op::NotExists
        }
    );
    assert_eq!(
        c("node.name=n-1"),
        Constraint {
            key: "node.name".into(),
            op: Op::Eq("n-1".into())
        }
    );
    assert_eq!(
        c("example.com/arch=x86_64"),
        Constraint {
            key: "example.com/arch".into(),
            op: Op::Eq("x86_64".into())
        }
    );
}

#[test]
fn display_round_trips() {
    for text in [
        "disk=ssd",
        "disk!=ssd",
        "zone in a,b,c",
        "zone in a",
        "gpu",
        "!gpu",
        "a/b.c-d_e=F.1",
    ] {
        let parsed = c(text);
        assert_eq!(parsed.to_string(), text);
        assert_eq!(c(&parsed.to_string()), parsed);
    }
    assert_eq!(c("zone in (a, b)").to_string(), "zone in a,b");
}

#[test]
fn rejects_bad_text_with_actionable_messages() {
    let err = |text: &str| text.parse::<Constraint>().unwrap_err().to_string();
    assert_eq!(
        err("disk>ssd"),
        r#"constraint "disk>ssd": expected key=value, key!=value, key in a,b, key or !key"#
    );
    assert_eq!(
        err(""),
        r#"constraint "": expected key=value, key!=value, key in a,b, key or !key"#
    );
    assert_eq!(
        err("!"),
        r#"constraint "!": expected key=value, key!=value, key in a,b, key or !key"#
    );
    assert_eq!(
        err("zone of a"),
        r#"constraint "zone of a": expected key=value, key!=value, key in a,b, key or !key"#
    );
    assert_eq!(
        err("zone in (a,b"),
        r#"constraint "zone in (a,b": expected key=value, key!=value, key in a,b, key or !key"#
    );
    assert_eq!(err("=ssd"), r#"constraint "=ssd": the key is empty"#);
    assert_eq!(err("disk="), r#"constraint "disk=": the value is empty"#);
    assert_eq!(
        err("disk type=ssd"),
        r#"constraint "disk type=ssd": key "disk type" may only contain letters, digits, '.', '_', '/' and '-'"#
    );
    assert_eq!(
        err("disk=s d"),
        r#"constraint "disk=s d": value "s d" may only contain letters, digits, '.', '_', '/' and '-'"#
    );
    assert_eq!(
        err("zone in"),
        r#"constraint "zone in": `in` needs at least one value, as in key in a,b"#
    );
    assert_eq!(
        err("zone in ()"),
        r#"constraint "zone in ()": `in` needs at least one value, as in key in a,b"#
    );
    assert_eq!(
        err("zone in a,,b"),
        r#"constraint "zone in a,,b": the value is empty"#
    );
    let long_key = "k".repeat(64);
    assert_eq!(
        err(&format!("{long_key}=v")),
        format!("constraint \"{long_key}=v\": the key is 64 characters long; the limit is 63")
    );
    assert!(c(&format!("{}=v", "k".repeat(63))).key.len() == 63);
    let long_value = "v".repeat(256);
    assert!(
        err(&format!("k={long_value}"))
            .ends_with("the value is 256 characters long; the limit is 255")
    );
    assert!(c(&format!("k={}", "v".repeat(255))).matches(&labels(&[("k", &"v".repeat(255))])));
}

#[test]
fn preferences_parse_with_and_without_weight() {
    let p: Preference = "zone=a:80".parse().unwrap();
    assert_eq!(
        p,
        Preference {
            constraint: c("zone=a"),
            weight: 80
        }
    );
    assert_eq!(p.to_string(), "zone=a:80");
    assert_eq!("zone=a".parse::<Preference>().unwrap().weight, 50);
    assert_eq!(
        "zone in a,b : -100".parse::<Preference>().unwrap().weight,
        -100
    );
    assert_eq!(
        "gpu:0".parse::<Preference>().unwrap(),
        Preference {
            constraint: c("gpu"),
            weight: 0
        }
    );
    assert_eq!(
        "zone=a:101".parse::<Preference>().unwrap_err().to_string(),
        r#"preference "zone=a:101": weight "101" must be an integer from -100 to 100"#
    );
    assert_eq!(
        "zone=a:".parse::<Preference>().unwrap_err().to_string(),
        r#"preference "zone=a:": weight "" must be an integer from -100 to 100"#
    );
    assert!(matches!(
        "disk>ssd:5".parse::<Preference>(),
        Err(ConstraintError::Syntax { .. })
    ));
}

#[test]
fn matches_labels() {
    let node = labels(&[("disk", "ssd"), ("zone", "b")]);
    assert!(c("disk=ssd").matches(&node));
    assert!(!c("disk=hdd").matches(&node));
    assert!(c("disk!=hdd").matches(&node));
    assert!(
        c("gpu!=a100").matches(&node),
        "a missing label differs from any value"
    );
    assert!(c("zone in a,b").matches(&node));
    assert!(!c("zone in a,c").matches(&node));
    assert!(!c("rack in a,b").matches(&node));
    assert!(c("disk").matches(&node));
    assert!(!c("gpu").matches(&node));
    assert!(c("!gpu").matches(&node));
    assert!(!c("!disk").matches(&node));
}

#[test]
fn postcard_round_trip() {
    for text in ["disk=ssd", "disk!=ssd", "zone in a,b,c", "gpu", "!gpu"] {
        let constraint = c(text);
        let bytes = postcard::to_stdvec(&constraint).unwrap();
        assert_eq!(
            postcard::from_bytes::<Constraint>(&bytes).unwrap(),
            constraint
        );
        let pref = Preference {
            constraint,
            weight: -7,
        };
        let bytes = postcard::to_stdvec(&pref).unwrap();
        assert_eq!(postcard::from_bytes::<Preference>(&bytes).unwrap(), pref);
    }
}
