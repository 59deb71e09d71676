//! The difference between two JSON documents as a JSON Patch (RFC 6902): what turns the first
//! into the second. Objects are compared member by member (`add`, `remove`, `replace` at the
//! member's path); arrays and scalars that differ are replaced whole (positions in an array
//! mean little in a configuration, and a replaced list reads better than index shuffles).

use serde_json::{Map, Value, json};

/// The operations that turn `from` into `to`, in a stable order (members sorted).
#[must_use]
pub fn json_patch(from: &Value, to: &Value) -> Vec<Value> {
    let mut ops = Vec::new();
    diff(from, to, &mut String::new(), &mut ops);
    ops
}

fn diff(from: &Value, to: &Value, path: &mut String, ops: &mut Vec<Value>) {
    match (from, to) {
        (Value::Object(a), Value::Object(b)) => members(a, b, path, ops),
        _ if from == to => {}
        _ => ops.push(json!({"op": "replace", "path": path.clone(), "value": to})),
    }
}

fn members(
    a: &Map<String, Value>,
    b: &Map<String, Value>,
    path: &mut String,
    ops: &mut Vec<Value>,
) {
    let mut names: Vec<&String> = a
        .keys()
        .chain(b.keys().filter(|k| !a.contains_key(*k)))
        .collect();
    names.sort();
    for name in names {
        let len = path.len();
        path.push('/');
        // RFC 6901: `~` is `~0`, `/` is `~1`.
        path.push_str(&name.replace('~', "~0").replace('/', "~1"));
        match (a.get(name), b.get(name)) {
            (Some(x), Some(y)) => diff(x, y, path, ops),
            (Some(_), None) => ops.push(json!({"op": "remove", "path": path.clone()})),
            (None, Some(y)) => ops.push(json!({"op": "add", "path": path.clone(), "value": y})),
            (None, None) => {}
        }
        path.truncate(len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Applies `ops` (the subset `json_patch` emits) to `doc`.
    fn apply(mut doc: Value, ops: &[Value]) -> Value {
        for op in ops {
            let path = op["path"].as_str().unwrap();
            if path.is_empty() {
                doc = op["value"].clone();
                continue;
            }
            let parts: Vec<String> = path[1..]
                .split('/')
                .map(|p| p.replace("~1", "/").replace("~0", "~"))
                .collect();
            let (last, parents) = parts.split_last().unwrap();
            let mut at = &mut doc;
            for p in parents {
                at = at.get_mut(p).unwrap();
            }
            let object = at.as_object_mut().unwrap();
            match op["op"].as_str().unwrap() {
                "remove" => {
                    object.remove(last).unwrap();
                }
                "add" | "replace" => {
                    object.insert(last.clone(), op["value"].clone());
                }
                other => panic!("{other}"),
            }
        }
        doc
    }

    #[test]
    fn the_patch_turns_one_document_into_the_other() {
        let from = json!({"a": 1, "b": {"c": [1, 2], "d": "x", "e/f": 1, "g~h": 2}, "gone": true});
        let to = json!({"a": 1, "b": {"c": [2], "d": "y", "e/f": 3, "g~h": 2, "new": null}, "added": {"x": 1}});
        let ops = json_patch(&from, &to);
        assert_eq!(apply(from.clone(), &ops), to);
        assert_eq!(
            ops,
            [
                json!({"op": "add", "path": "/added", "value": {"x": 1}}),
                json!({"op": "replace", "path": "/b/c", "value": [2]}),
                json!({"op": "replace", "path": "/b/d", "value": "y"}),
                json!({"op": "replace", "path": "/b/e~1f", "value": 3}),
                json!({"op": "add", "path": "/b/new", "value": null}),
                json!({"op": "remove", "path": "/gone"}),
            ]
        );
        assert!(json_patch(&to, &to).is_empty());
        assert_eq!(
            json_patch(&json!(1), &json!("x")),
            [json!({"op": "replace", "path": "", "value": "x"})]
        );
    }
}
