//! List filters in containerd's syntax, as far as containerd sends them to a snapshotter:
//! `field==value`, `field!=value` and `field` (present), joined by `,` (all must hold);
//! fields `name`, `parent`, `kind`, `labels.KEY` or `labels."KEY"`; values bare or quoted.
//! A clause this does not understand (a `~=` regular expression) matches: containerd checks
//! what a backend lists again before using it, so listing too much is slower, never wrong.

use super::state::{Kind, Record};

pub struct Filter {
    clauses: Vec<Clause>,
}

struct Clause {
    field: Vec<String>,
    op: Op,
}

enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Unknown,
}

impl Filter {
    pub fn parse(text: &str) -> Filter {
        let clauses = split_outside_quotes(text, ',')
            .iter()
            .filter(|c| !c.trim().is_empty())
            .map(|c| Clause::parse(c.trim()))
            .collect();
        Filter { clauses }
    }

    pub fn matches(&self, key: &str, r: &Record) -> bool {
        self.clauses.iter().all(|c| c.matches(key, r))
    }
}

impl Clause {
    fn parse(c: &str) -> Clause {
        let (path, op) = if let Some((p, v)) = c.split_once("!=") {
            (p, Op::NotEqual(unquote(v)))
        } else if let Some((p, v)) = c.split_once("==") {
            (p, Op::Equal(unquote(v)))
        } else if c.contains("~=") {
            (c, Op::Unknown)
        } else {
            (c, Op::Present)
        };
        let field = split_outside_quotes(path, '.')
            .iter()
            .map(|s| unquote(s))
            .collect();
        Clause { field, op }
    }

    fn matches(&self, key: &str, r: &Record) -> bool {
        let kind = match r.kind {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        };
        let value: Option<&str> = match self.field.as_slice() {
            [f] if f == "name" => Some(key),
            // containerd asks for `parent==""` for a base layer.
            [f] if f == "parent" => Some(&r.parent),
            [f] if f == "kind" => Some(kind),
            [f, rest @ ..] if f == "labels" && !rest.is_empty() => {
                r.labels.get(&rest.join(".")).map(|v| &v[..])
            }
            _ => return true,
        };
        match &self.op {
            Op::Present => value.is_some(),
            Op::Equal(v) => value == Some(v.as_str()),
            Op::NotEqual(v) => value != Some(v.as_str()),
            Op::Unknown => true,
        }
    }
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    if s.len() >= 2 && s.starts_with('"') && s.ends_with('"') {
        s[1..s.len() - 1].replace("\\\"", "\"")
    } else {
        s.to_string()
    }
}

fn split_outside_quotes(s: &str, sep: char) -> Vec<String> {
    let (mut out, mut cur, mut quoted) = (Vec::new(), String::new(), false);
    for ch in s.chars() {
        match ch {
            '"' => {
                quoted = !quoted;
                cur.push(ch);
            }
            c if c == sep && !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(parent: &str, labels: &[(&str, &str)]) -> Record {
        Record {
            id: 1,
            kind: Kind::Committed,
            parent: parent.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            created: 0,
            updated: 0,
            usage: None,
            remote: None,
        }
    }

    #[test]
    fn the_filter_containerd_sends_after_already_exists() {
        let f = Filter::parse(r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="p1""#);
        let r = record("p1", &[("containerd.io/snapshot.ref", "sha256:abc")]);
        assert!(f.matches("k", &r));
        assert!(!f.matches(
            "k",
            &record("p2", &[("containerd.io/snapshot.ref", "sha256:abc")])
        ));
        assert!(!f.matches("k", &record("p1", &[])));
        assert!(Filter::parse("kind==committed,name==k").matches("k", &r));
        let base = record("", &[("containerd.io/snapshot.ref", "sha256:abc")]);
        let f = Filter::parse(r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="""#);
        assert!(f.matches("k", &base), "a base layer's empty parent");
        assert!(!Filter::parse("kind==active").matches("k", &r));
        assert!(
            Filter::parse("labels.x~=.*").matches("k", &r),
            "unknown clauses match"
        );
    }
}
