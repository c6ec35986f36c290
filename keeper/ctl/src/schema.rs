//! Parses a config file (TOML or JSON), validates it against the service's published JSON Schema,
//! and names each problem by field and by line in the file the operator wrote.
//!
//! The schema validator speaks JSON pointers into the parsed value; to give lines, both formats
//! are scanned once more for the byte offset of every key and array element (TOML through the
//! `toml` crate's spanned parse tree, JSON through a small scan of the already-valid text).

use std::collections::HashMap;
use std::path::Path;

use anyhow::anyhow;
use anyhow::bail;
use jsonschema::error::ValidationErrorKind;
use keeper_sdk::layout::Format;
use serde_json::Value;

/// A path into the document: object keys and array indexes (as decimal strings), as in a JSON
/// pointer.
type DocPath = Vec<String>;

/// A parsed config file and where each of its fields starts.
pub struct Parsed {
    pub value: Value,
    positions: Positions,
}

/// Byte offsets of every key and array element in the file, and the file's text for lines.
struct Positions {
    offsets: HashMap<DocPath, usize>,
    text: String,
}

impl Positions {
    fn line_of_offset(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1
    }

    /// The line of `path`, or of its closest ancestor the file spells out (line 1 for the root).
    fn line_of(&self, path: &[String]) -> usize {
        (0..=path.len())
            .rev()
            .find_map(|n| self.offsets.get(&path[..n]))
            .map(|o| self.line_of_offset(*o))
            .unwrap_or(1)
    }
}

/// One schema violation, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaError {
    /// 1-based line in the file.
    pub line: usize,
    /// The field as an operator spells it: `server.port`, `routes[2].host`.
    pub field: String,
    pub message: String,
}

/// The format a file is in, from its extension.
pub fn format_of(path: &Path) -> anyhow::Result<Format> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("toml") => Ok(Format::Toml),
        Some("json") => Ok(Format::Json),
        _ => bail!(
            "{}: unknown config format: the file name must end in .toml or .json",
            path.display()
        ),
    }
}

/// Parses `text` as `format`; a syntax error names the line.
pub fn parse(text: &str, format: Format) -> anyhow::Result<Parsed> {
    match format {
        Format::Toml => parse_toml(text),
        Format::Json => parse_json(text),
    }
}

fn parse_toml(text: &str) -> anyhow::Result<Parsed> {
    let line_of = |offset: usize| {
        text.as_bytes()[..offset.min(text.len())]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1
    };
    let tree = toml::de::DeTable::parse(text).map_err(|e| {
        let line = e.span().map(|s| line_of(s.start)).unwrap_or(1);
        anyhow!("line {line}: {}", e.message().trim())
    })?;
    let table: toml::Table = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(s.start)).unwrap_or(1);
        anyhow!("line {line}: {}", e.message().trim())
    })?;
    let mut offsets = HashMap::new();
    offsets.insert(Vec::new(), 0);
    let mut path = Vec::new();
    walk_toml_table(tree.get_ref(), &mut path, &mut offsets);
    Ok(Parsed {
        value: toml_to_json(toml::Value::Table(table)),
        positions: Positions {
            offsets,
            text: text.to_string(),
        },
    })
}

fn walk_toml_table(
    table: &toml::de::DeTable<'_>,
    path: &mut DocPath,
    offsets: &mut HashMap<DocPath, usize>,
) {
    for (key, value) in table.iter() {
        path.push(key.get_ref().to_string());
        offsets.insert(path.clone(), key.span().start);
        walk_toml_value(value.get_ref(), path, offsets);
        path.pop();
    }
}

fn walk_toml_value(
    value: &toml::de::DeValue<'_>,
    path: &mut DocPath,
    offsets: &mut HashMap<DocPath, usize>,
) {
    match value {
        toml::de::DeValue::Table(t) => walk_toml_table(t, path, offsets),
        toml::de::DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push(i.to_string());
                offsets.insert(path.clone(), item.span().start);
                walk_toml_value(item.get_ref(), path, offsets);
                path.pop();
            }
        }
        _ => {}
    }
}

/// TOML as the JSON the schema speaks about; datetimes become their RFC 3339 strings.
fn toml_to_json(value: toml::Value) -> Value {
    match value {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(i) => Value::from(i),
        toml::Value::Float(f) => serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::Null),
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(a) => Value::Array(a.into_iter().map(toml_to_json).collect()),
        toml::Value::Table(t) => {
            Value::Object(t.into_iter().map(|(k, v)| (k, toml_to_json(v))).collect())
        }
    }
}

fn parse_json(text: &str) -> anyhow::Result<Parsed> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        let message = e.to_string();
        let message = message
            .split(" at line ")
            .next()
            .unwrap_or(&message)
            .to_string();
        anyhow!("line {}: {message}", e.line())
    })?;
    let mut scan = JsonScan {
        bytes: text.as_bytes(),
        at: 0,
        offsets: HashMap::new(),
    };
    scan.offsets.insert(Vec::new(), 0);
    scan.value(&mut Vec::new());
    Ok(Parsed {
        value,
        positions: Positions {
            offsets: scan.offsets,
            text: text.to_string(),
        },
    })
}

/// Records the byte offset of every object key and array element of valid JSON text.
struct JsonScan<'a> {
    bytes: &'a [u8],
    at: usize,
    offsets: HashMap<DocPath, usize>,
}

impl JsonScan<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_whitespace()) {
            self.at += 1;
        }
    }

    /// A string starting at `self.at` (a quote); returns it decoded.
    fn string(&mut self) -> String {
        let start = self.at;
        self.at += 1;
        while let Some(b) = self.peek() {
            self.at += 1;
            match b {
                b'\\' => self.at += 1,
                b'"' => break,
                _ => {}
            }
        }
        let raw = &self.bytes[start..self.at.min(self.bytes.len())];
        serde_json::from_slice(raw).unwrap_or_default()
    }

    fn value(&mut self, path: &mut DocPath) {
        self.skip_ws();
        match self.peek() {
            Some(b'{') => {
                self.at += 1;
                loop {
                    self.skip_ws();
                    match self.peek() {
                        Some(b'"') => {}
                        Some(_) => {
                            // '}' of an empty object (or a ',' already consumed below).
                            self.at += 1;
                            return;
                        }
                        None => return,
                    }
                    let key_at = self.at;
                    let key = self.string();
                    path.push(key);
                    self.offsets.insert(path.clone(), key_at);
                    self.skip_ws();
                    self.at += 1; // ':'
                    self.value(path);
                    path.pop();
                    self.skip_ws();
                    match self.peek() {
                        Some(b',') => self.at += 1,
                        Some(_) => {
                            self.at += 1;
                            return;
                        }
                        None => return,
                    }
                }
            }
            Some(b'[') => {
                self.at += 1;
                self.skip_ws();
                if self.peek() == Some(b']') {
                    self.at += 1;
                    return;
                }
                let mut index = 0usize;
                loop {
                    self.skip_ws();
                    path.push(index.to_string());
                    self.offsets.insert(path.clone(), self.at);
                    self.value(path);
                    path.pop();
                    index += 1;
                    self.skip_ws();
                    match self.peek() {
                        Some(b',') => self.at += 1,
                        Some(_) => {
                            self.at += 1;
                            return;
                        }
                        None => return,
                    }
                }
            }
            Some(b'"') => {
                self.string();
            }
            Some(_) => {
                while self
                    .peek()
                    .is_some_and(|b| !matches!(b, b',' | b']' | b'}') && !b.is_ascii_whitespace())
                {
                    self.at += 1;
                }
            }
            None => {}
        }
    }
}

/// The JSON pointer `/a/b~1c/0` as segments.
fn pointer_segments(pointer: &str) -> DocPath {
    if pointer.is_empty() {
        return Vec::new();
    }
    pointer
        .trim_start_matches('/')
        .split('/')
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect()
}

/// `path` as an operator spells it, using `root` to tell array indexes from keys.
fn field_name(root: &Value, path: &[String]) -> String {
    let mut name = String::new();
    let mut cur = Some(root);
    for seg in path {
        match cur {
            Some(Value::Array(items)) => {
                name.push_str(&format!("[{seg}]"));
                cur = seg.parse::<usize>().ok().and_then(|i| items.get(i));
            }
            other => {
                if !name.is_empty() {
                    name.push('.');
                }
                name.push_str(seg);
                cur = other.and_then(|v| v.get(seg));
            }
        }
    }
    if name.is_empty() {
        "(document)".into()
    } else {
        name
    }
}

/// Every way `parsed` breaks `schema`, in file order. Fails when the schema itself is unusable.
pub fn validate(schema: &Value, parsed: &Parsed) -> anyhow::Result<Vec<SchemaError>> {
    let validator = jsonschema::validator_for(schema)
        .map_err(|e| anyhow!("the published schema is not a valid JSON Schema: {e}"))?;
    let mut errors = Vec::new();
    for error in validator.iter_errors(&parsed.value) {
        let at = pointer_segments(error.instance_path().as_str());
        match error.kind() {
            ValidationErrorKind::AdditionalProperties { unexpected }
            | ValidationErrorKind::UnevaluatedProperties { unexpected } => {
                for key in unexpected {
                    let mut path = at.clone();
                    path.push(key.clone());
                    let field = field_name(&parsed.value, &path);
                    errors.push(SchemaError {
                        line: parsed.positions.line_of(&path),
                        message: format!("unknown field `{field}`"),
                        field,
                    });
                }
            }
            ValidationErrorKind::Required { property } => {
                let mut path = at.clone();
                path.push(property.as_str().unwrap_or_default().to_string());
                let field = field_name(&parsed.value, &path);
                errors.push(SchemaError {
                    line: parsed.positions.line_of(&at),
                    message: format!("missing required field `{field}`"),
                    field,
                });
            }
            ValidationErrorKind::Type { .. } => {
                let field = field_name(&parsed.value, &at);
                errors.push(SchemaError {
                    line: parsed.positions.line_of(&at),
                    message: format!("field `{field}` has the wrong type: {error}"),
                    field,
                });
            }
            _ => {
                let field = field_name(&parsed.value, &at);
                errors.push(SchemaError {
                    line: parsed.positions.line_of(&at),
                    message: format!("field `{field}`: {error}"),
                    field,
                });
            }
        }
    }
    errors.sort_by(|a, b| (a.line, &a.field).cmp(&(b.line, &b.field)));
    errors.dedup();
    Ok(errors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// What schemars publishes for a struct with `deny_unknown_fields` and a nested table.
    fn schema() -> Value {
        json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "additionalProperties": false,
            "required": ["name", "port", "server"],
            "properties": {
                "name": {"type": "string"},
                "port": {"type": "integer", "format": "uint16", "minimum": 0, "maximum": 65535},
                "server": {"$ref": "#/$defs/Server"},
                "routes": {"type": "array", "items": {"$ref": "#/$defs/Route"}}
            },
            "$defs": {
                "Server": {
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["host"],
                    "properties": {"host": {"type": "string"}, "workers": {"type": "integer"}}
                },
                "Route": {
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["path"],
                    "properties": {"path": {"type": "string"}}
                }
            }
        })
    }

    fn check(text: &str, format: Format) -> Vec<SchemaError> {
        validate(&schema(), &parse(text, format).unwrap()).unwrap()
    }

    #[test]
    fn valid_toml_has_no_errors() {
        let text = "name = \"a\"\nport = 80\n\n[server]\nhost = \"h\"\n";
        assert_eq!(check(text, Format::Toml), vec![]);
    }

    #[test]
    fn toml_unknown_field_names_field_and_line() {
        let text = "name = \"a\"\nport = 80\n\n[server]\nhost = \"h\"\ncolour = \"red\"\n";
        let errors = check(text, Format::Toml);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].field, "server.colour");
        assert_eq!(errors[0].line, 6);
        assert!(errors[0].message.contains("unknown field `server.colour`"));
    }

    #[test]
    fn toml_wrong_type_names_field_and_line() {
        let text = "name = \"a\"\nport = \"eighty\"\n[server]\nhost = \"h\"\nworkers = 4\n";
        let errors = check(text, Format::Toml);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!((errors[0].field.as_str(), errors[0].line), ("port", 2));
        assert!(
            errors[0].message.contains("wrong type"),
            "{}",
            errors[0].message
        );
    }

    #[test]
    fn toml_missing_required_points_at_its_table() {
        let text = "name = \"a\"\nport = 80\n\n[server]\nworkers = 2\n";
        let errors = check(text, Format::Toml);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].field, "server.host");
        assert_eq!(errors[0].line, 4, "the [server] header");
        assert!(
            errors[0]
                .message
                .contains("missing required field `server.host`")
        );
        // Missing at the root: line 1.
        let errors = check("name = \"a\"\n[server]\nhost = \"h\"\n", Format::Toml);
        assert_eq!((errors[0].field.as_str(), errors[0].line), ("port", 1));
    }

    #[test]
    fn toml_array_of_tables_elements_have_lines() {
        let text = "name = \"a\"\nport = 1\n[server]\nhost = \"h\"\n\n[[routes]]\npath = \"/\"\n\n[[routes]]\npath = 3\n";
        let errors = check(text, Format::Toml);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(
            (errors[0].field.as_str(), errors[0].line),
            ("routes[1].path", 10)
        );
    }

    #[test]
    fn json_errors_name_field_and_line() {
        let text = r#"{
  "name": "a",
  "port": true,
  "server": {
    "host": "h",
    "extra": [1, 2]
  },
  "routes": [
    {"path": "/"},
    {}
  ]
}"#;
        let errors = check(text, Format::Json);
        let got: Vec<(&str, usize)> = errors.iter().map(|e| (e.field.as_str(), e.line)).collect();
        assert_eq!(
            got,
            vec![("port", 3), ("server.extra", 6), ("routes[1].path", 10)],
            "{errors:?}"
        );
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let e = parse("name = \"a\"\nport = = 3\n", Format::Toml)
            .err()
            .unwrap();
        assert!(e.to_string().starts_with("line 2:"), "{e}");
        let e = parse("{\n\"a\": 1,\n}", Format::Json).err().unwrap();
        assert!(e.to_string().starts_with("line 3:"), "{e}");
    }

    #[test]
    fn formats_come_from_extensions() {
        assert_eq!(format_of(Path::new("a/b.toml")).unwrap(), Format::Toml);
        assert_eq!(format_of(Path::new("b.json")).unwrap(), Format::Json);
        assert!(
            format_of(Path::new("b.yaml"))
                .unwrap_err()
                .to_string()
                .contains(".toml or .json")
        );
    }

    #[test]
    fn pointers_unescape() {
        assert_eq!(pointer_segments(""), Vec::<String>::new());
        assert_eq!(pointer_segments("/a~1b/0/c~0"), vec!["a/b", "0", "c~"]);
    }
}
