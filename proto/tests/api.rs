//! The published API of `patchbay.v1`, checked against what is committed:
//!
//! - `proto/baseline/patchbay_v1.binpb`: the descriptors of the last recorded API
//!   (without comments). Today's descriptors must not break it (buf's `breaking` rules,
//!   see [`breaking_changes`]) and must equal it (so that what is added gets protected
//!   too). After an additive change: `UPDATE_PROTO_BASELINE=1 cargo test -p
//!   patchbay-proto --test api`. A breaking change goes into a new package
//!   (`patchbay.v2`), never into this baseline.
//! - `docs/api.md`: the API reference, generated from the descriptors and their comments
//!   (and from [`patchbay_proto::errors`]). After any `.proto` edit: `UPDATE_API_DOCS=1
//!   cargo test -p patchbay-proto --test api`.
//!
//! Both at once (e.g. after a merge): `UPDATE_PROTO_BASELINE=1 UPDATE_API_DOCS=1 cargo
//! test -p patchbay-proto --test api`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{
    DescriptorProto, EnumDescriptorProto, FieldDescriptorProto, FileDescriptorProto,
    FileDescriptorSet, ServiceDescriptorProto,
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn baseline_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("baseline/patchbay_v1.binpb")
}

fn docs_path() -> PathBuf {
    root().join("docs/api.md")
}

/// Today's descriptors, with comments.
fn current() -> FileDescriptorSet {
    FileDescriptorSet::decode(patchbay_proto::FILE_DESCRIPTOR_SET).expect("decode descriptors")
}

/// The descriptors without source info: what the baseline records.
fn stripped(mut fds: FileDescriptorSet) -> FileDescriptorSet {
    for f in &mut fds.file {
        f.source_code_info = None;
    }
    fds
}

fn update(var: &str) -> bool {
    std::env::var_os(var).is_some_and(|v| v == "1")
}

// ------------------------------------------------------------------ the rules

/// Every message, enum and service of a descriptor set, by fully-qualified name
/// (`patchbay.v1.Tracer`, `patchbay.v1.AgentMessage.Inner`): compared by name across
/// files, like buf's PACKAGE category (moving a message between files of a package does
/// not break the wire).
#[derive(Default)]
struct Index<'a> {
    messages: BTreeMap<String, &'a DescriptorProto>,
    enums: BTreeMap<String, &'a EnumDescriptorProto>,
    services: BTreeMap<String, &'a ServiceDescriptorProto>,
}

impl<'a> Index<'a> {
    fn of(fds: &'a FileDescriptorSet) -> Self {
        let mut ix = Index::default();
        for f in &fds.file {
            let pkg = f.package();
            for m in &f.message_type {
                ix.add_message(pkg, m);
            }
            for e in &f.enum_type {
                ix.enums.insert(format!("{pkg}.{}", e.name()), e);
            }
            for s in &f.service {
                ix.services.insert(format!("{pkg}.{}", s.name()), s);
            }
        }
        ix
    }

    fn add_message(&mut self, scope: &str, m: &'a DescriptorProto) {
        let name = format!("{scope}.{}", m.name());
        for n in &m.nested_type {
            self.add_message(&name, n);
        }
        for e in &m.enum_type {
            self.enums.insert(format!("{name}.{}", e.name()), e);
        }
        self.messages.insert(name, m);
    }
}

fn reserved(m: &DescriptorProto, n: i32) -> bool {
    // DescriptorProto reserved ranges are [start, end).
    m.reserved_range
        .iter()
        .any(|r| r.start() <= n && n < r.end())
}

fn enum_reserved(e: &EnumDescriptorProto, n: i32) -> bool {
    // EnumDescriptorProto reserved ranges are [start, end].
    e.reserved_range
        .iter()
        .any(|r| r.start() <= n && n <= r.end())
}

/// The oneof a field belongs to (a proto3 `optional` field's synthetic oneof counts as
/// none: its presence is compared through the label instead).
fn oneof_of<'m>(m: &'m DescriptorProto, f: &FieldDescriptorProto) -> Option<&'m str> {
    if f.proto3_optional() {
        return None;
    }
    f.oneof_index
        .and_then(|i| m.oneof_decl.get(i as usize))
        .map(|o| o.name())
}

fn cardinality(f: &FieldDescriptorProto) -> &'static str {
    match (f.label(), f.proto3_optional()) {
        (Label::Repeated, _) => "repeated",
        (Label::Required, _) => "required",
        (_, true) => "optional",
        _ => "singular",
    }
}

fn type_of(f: &FieldDescriptorProto) -> String {
    match f.r#type() {
        Type::Message | Type::Enum | Type::Group => f.type_name().trim_start_matches('.').into(),
        t => t.as_str_name().trim_start_matches("TYPE_").to_lowercase(),
    }
}

/// The changes from `old` to `new` that break clients, following buf's `breaking` rules
/// of the WIRE_JSON category: no deleted message, enum, service or RPC; no deleted field
/// or enum value unless its number is reserved; a field keeps its number, name, type,
/// cardinality and oneof; an enum value keeps its name; an RPC keeps its request and
/// response types and streaming; reserved numbers stay reserved and are never reused.
/// New messages, enums, services, RPCs, fields and enum values are allowed.
fn breaking_changes(old: &FileDescriptorSet, new: &FileDescriptorSet) -> Vec<String> {
    let (old, new) = (Index::of(old), Index::of(new));
    let mut out = Vec::new();
    for (name, om) in &old.messages {
        let Some(nm) = new.messages.get(name) else {
            out.push(format!("message {name} deleted"));
            continue;
        };
        let fields: BTreeMap<i32, &FieldDescriptorProto> =
            nm.field.iter().map(|f| (f.number(), f)).collect();
        for of in &om.field {
            let n = of.number();
            let what = format!("field {name}.{} ({n})", of.name());
            let Some(nf) = fields.get(&n) else {
                if !reserved(nm, n) {
                    out.push(format!("{what} deleted without reserving its number"));
                }
                continue;
            };
            if nf.name() != of.name() {
                out.push(format!("{what} renamed to {}", nf.name()));
            }
            if type_of(nf) != type_of(of) {
                out.push(format!(
                    "{what} changed type from {} to {}",
                    type_of(of),
                    type_of(nf)
                ));
            }
            if cardinality(nf) != cardinality(of) {
                out.push(format!(
                    "{what} changed cardinality from {} to {}",
                    cardinality(of),
                    cardinality(nf)
                ));
            }
            if oneof_of(nm, nf) != oneof_of(om, of) {
                out.push(format!(
                    "{what} moved from oneof {:?} to oneof {:?}",
                    oneof_of(om, of),
                    oneof_of(nm, nf)
                ));
            }
        }
        for r in &om.reserved_range {
            for n in r.start()..r.end() {
                if !reserved(nm, n) {
                    match fields.get(&n) {
                        Some(f) => out.push(format!(
                            "field {name}.{} reuses the reserved number {n}",
                            f.name()
                        )),
                        None => out.push(format!("{name}: reserved number {n} unreserved")),
                    }
                }
            }
        }
        for r in &om.reserved_name {
            if !nm.reserved_name.contains(r) {
                out.push(format!("{name}: reserved name {r} unreserved"));
            }
        }
    }
    for (name, oe) in &old.enums {
        let Some(ne) = new.enums.get(name) else {
            out.push(format!("enum {name} deleted"));
            continue;
        };
        let values: BTreeMap<i32, &str> = ne.value.iter().map(|v| (v.number(), v.name())).collect();
        for ov in &oe.value {
            let n = ov.number();
            match values.get(&n) {
                None if !enum_reserved(ne, n) => out.push(format!(
                    "enum value {name}.{} ({n}) deleted without reserving its number",
                    ov.name()
                )),
                Some(nv) if *nv != ov.name() => out.push(format!(
                    "enum value {name}.{} ({n}) renamed to {nv}",
                    ov.name()
                )),
                _ => {}
            }
        }
        for r in &oe.reserved_range {
            for n in r.start()..=r.end() {
                if !enum_reserved(ne, n) {
                    out.push(format!("{name}: reserved enum number {n} unreserved"));
                }
            }
        }
    }
    for (name, os) in &old.services {
        let Some(ns) = new.services.get(name) else {
            out.push(format!("service {name} deleted"));
            continue;
        };
        for om in &os.method {
            let what = format!("rpc {name}.{}", om.name());
            let Some(nm) = ns.method.iter().find(|m| m.name() == om.name()) else {
                out.push(format!("{what} deleted"));
                continue;
            };
            if nm.input_type() != om.input_type() {
                out.push(format!(
                    "{what} changed its request from {} to {}",
                    om.input_type(),
                    nm.input_type()
                ));
            }
            if nm.output_type() != om.output_type() {
                out.push(format!(
                    "{what} changed its response from {} to {}",
                    om.output_type(),
                    nm.output_type()
                ));
            }
            if nm.client_streaming() != om.client_streaming()
                || nm.server_streaming() != om.server_streaming()
            {
                out.push(format!("{what} changed streaming"));
            }
        }
    }
    out
}

// ---------------------------------------------------------------- the checks

#[test]
fn no_breaking_change_against_the_baseline() {
    let now = stripped(current());
    let path = baseline_path();
    if update("UPDATE_PROTO_BASELINE") {
        std::fs::create_dir_all(path.parent().expect("dir")).expect("baseline dir");
        std::fs::write(&path, now.encode_to_vec()).expect("write baseline");
        return;
    }
    let bytes = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read the baseline {} ({e}): record it with \
             `UPDATE_PROTO_BASELINE=1 cargo test -p patchbay-proto --test api`",
            path.display()
        )
    });
    let base = FileDescriptorSet::decode(bytes.as_slice()).expect("decode the baseline");
    let breaks = breaking_changes(&base, &now);
    assert!(
        breaks.is_empty(),
        "the .proto files break patchbay.v1 against {}:\n  {}\n\
         patchbay.v1 promises: field and enum numbers are never reused or renumbered, \
         nothing is deleted without reserving its number, types and RPC signatures never \
         change. Make the change additive, or put it in a new package (patchbay.v2).",
        path.display(),
        breaks.join("\n  ")
    );
    assert!(
        base == now,
        "the .proto files add to the API recorded in {}: record the additions (so that \
         they are protected too) with `UPDATE_PROTO_BASELINE=1 cargo test -p \
         patchbay-proto --test api`",
        path.display()
    );
}

#[test]
fn api_reference_is_up_to_date() {
    let text = reference(&current());
    let path = docs_path();
    if update("UPDATE_API_DOCS") {
        std::fs::create_dir_all(path.parent().expect("dir")).expect("docs dir");
        std::fs::write(&path, &text).expect("write docs/api.md");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != text {
        let line = committed
            .lines()
            .zip(text.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(committed.lines().count().min(text.lines().count()));
        panic!(
            "{} is stale (first difference at line {}): regenerate it with \
             `UPDATE_API_DOCS=1 cargo test -p patchbay-proto --test api`",
            path.display(),
            line + 1
        );
    }
}

/// Every service, RPC, message, field, enum and enum value is documented in its
/// `.proto` file.
#[test]
fn the_api_is_documented() {
    let fds = current();
    let mut missing = Vec::new();
    for f in &fds.file {
        let docs = Docs::of(f);
        for (path, what) in elements(f) {
            if docs.get(&path).is_empty() {
                missing.push(format!("{}: {what}", f.name()));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "undocumented in the .proto files:\n  {}",
        missing.join("\n  ")
    );
}

// ------------------------------------------------------------ the reference

/// The comments of a file, by source path.
struct Docs(BTreeMap<Vec<i32>, String>);

impl Docs {
    fn of(f: &FileDescriptorProto) -> Docs {
        let mut map = BTreeMap::new();
        for l in f
            .source_code_info
            .as_ref()
            .map(|s| s.location.as_slice())
            .unwrap_or_default()
        {
            let text = [l.leading_comments(), l.trailing_comments()]
                .iter()
                .map(|c| c.trim())
                .filter(|c| !c.is_empty())
                .collect::<Vec<_>>()
                .join("\n");
            if !text.is_empty() {
                map.insert(l.path.clone(), text);
            }
        }
        Docs(map)
    }

    fn get(&self, path: &[i32]) -> &str {
        self.0.get(path).map(String::as_str).unwrap_or("")
    }

    /// For a table cell: one line, pipes escaped.
    fn cell(&self, path: &[i32]) -> String {
        self.get(path)
            .lines()
            .map(str::trim)
            .collect::<Vec<_>>()
            .join(" ")
            .replace('|', "\\|")
    }

    /// For a paragraph: comment lines joined (blank lines kept as paragraph breaks).
    fn para(&self, path: &[i32]) -> String {
        self.get(path)
            .lines()
            .map(str::trim)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

// Field numbers of descriptor.proto, for source paths.
const FILE_MESSAGE: i32 = 4;
const FILE_ENUM: i32 = 5;
const FILE_SERVICE: i32 = 6;
const FILE_SYNTAX: i32 = 12;
const MESSAGE_FIELD: i32 = 2;
const MESSAGE_NESTED: i32 = 3;
const MESSAGE_ENUM: i32 = 4;
const ENUM_VALUE: i32 = 2;
const SERVICE_METHOD: i32 = 2;

/// Every documentable element of a file: (source path, description).
fn elements(f: &FileDescriptorProto) -> Vec<(Vec<i32>, String)> {
    fn message(out: &mut Vec<(Vec<i32>, String)>, path: Vec<i32>, m: &DescriptorProto) {
        if m.options.as_ref().is_some_and(|o| o.map_entry()) {
            return;
        }
        out.push((path.clone(), format!("message {}", m.name())));
        for (i, fl) in m.field.iter().enumerate() {
            let mut p = path.clone();
            p.extend([MESSAGE_FIELD, i as i32]);
            out.push((p, format!("field {}.{}", m.name(), fl.name())));
        }
        for (i, n) in m.nested_type.iter().enumerate() {
            let mut p = path.clone();
            p.extend([MESSAGE_NESTED, i as i32]);
            message(out, p, n);
        }
        for (i, e) in m.enum_type.iter().enumerate() {
            let mut p = path.clone();
            p.extend([MESSAGE_ENUM, i as i32]);
            enumeration(out, p, e);
        }
    }
    fn enumeration(out: &mut Vec<(Vec<i32>, String)>, path: Vec<i32>, e: &EnumDescriptorProto) {
        out.push((path.clone(), format!("enum {}", e.name())));
        for (i, v) in e.value.iter().enumerate() {
            let mut p = path.clone();
            p.extend([ENUM_VALUE, i as i32]);
            out.push((p, format!("enum value {}", v.name())));
        }
    }
    let mut out = Vec::new();
    for (i, s) in f.service.iter().enumerate() {
        out.push((
            vec![FILE_SERVICE, i as i32],
            format!("service {}", s.name()),
        ));
        for (j, m) in s.method.iter().enumerate() {
            out.push((
                vec![FILE_SERVICE, i as i32, SERVICE_METHOD, j as i32],
                format!("rpc {}.{}", s.name(), m.name()),
            ));
        }
    }
    for (i, m) in f.message_type.iter().enumerate() {
        message(&mut out, vec![FILE_MESSAGE, i as i32], m);
    }
    for (i, e) in f.enum_type.iter().enumerate() {
        enumeration(&mut out, vec![FILE_ENUM, i as i32], e);
    }
    out
}

/// A type for people: `uint64`, `repeated string`, `map<string, uint64>`, or a link to
/// a message or enum of the reference.
fn type_cell(f: &FieldDescriptorProto, maps: &BTreeMap<String, (String, String)>) -> String {
    let base = match f.r#type() {
        Type::Message | Type::Enum => {
            let full = f.type_name().trim_start_matches('.');
            if let Some((k, v)) = maps.get(full) {
                return format!("map<{k}, {v}>");
            }
            link(full)
        }
        _ => type_of(f),
    };
    match cardinality(f) {
        "repeated" => format!("repeated {base}"),
        "optional" => format!("optional {base}"),
        _ => base,
    }
}

/// `patchbay.v1.Tracer` → `[Tracer](#tracer)`; names outside `patchbay.v1` as code.
fn link(full: &str) -> String {
    match full.strip_prefix("patchbay.v1.") {
        Some(short) => format!("[{short}](#{})", short.to_lowercase().replace('.', "")),
        None => format!("`{full}`"),
    }
}

fn reference(fds: &FileDescriptorSet) -> String {
    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(w, "# patchbay API reference (`patchbay.v1`)\n");
    let _ = writeln!(
        w,
        "<!-- Generated from proto/proto/patchbay/v1/*.proto by proto/tests/api.rs: do not \
         edit. Regenerate with `UPDATE_API_DOCS=1 cargo test -p patchbay-proto --test api`. -->\n"
    );
    let _ = writeln!(
        w,
        "patchbayd serves the `Control` service to tools (the Rust SDK, the `patchbay` CLI, \
         or any gRPC client) on its Unix socket (default `$PATCHBAY_SOCKET`, else \
         `$XDG_RUNTIME_DIR/patchbay/patchbayd.sock`, else `/tmp/patchbay-$UID/patchbayd.sock`) \
         and, with `--listen tcp://HOST:PORT --token-file FILE`, on TCP (send \
         `authorization: Bearer TOKEN`). It also serves gRPC server reflection (v1 and \
         v1alpha: `grpcurl -plaintext -unix SOCKET list`) and the standard health \
         service `grpc.health.v1.Health` (`SERVING` once the tracer store is loaded, \
         `NOT_SERVING` while shutting down; no token needed over TCP). The `Agent` service \
         is the in-process agent's protocol: it is not listed by reflection and not meant \
         for tools.\n"
    );
    let _ = writeln!(
        w,
        "gRPC clients whose transport sends the socket path as the HTTP/2 `:authority` \
         (grpc's C core: Python, Ruby, C++) must set a plain authority over the Unix socket, \
         e.g. Python's `options=[(\"grpc.default_authority\", \"localhost\")]`; \
         `sdk/python/patchbay_example.py` is a complete client.\n"
    );
    let _ = writeln!(w, "## Versioning\n");
    let _ = writeln!(
        w,
        "`patchbay.v1` only grows: field and enum numbers are never reused or renumbered, \
         fields keep their names and types, RPCs keep their signatures, nothing is deleted \
         without reserving its number, and new fields are optional (proto3: a client that \
         does not set one gets the documented default of its zero value). \
         `proto/tests/api.rs` checks this against the committed descriptors in \
         `proto/baseline/`. A breaking change means a new package, `patchbay.v2`. Clients \
         may send `x-patchbay-protocol: {}`; another value is refused with \
         `FAILED_PRECONDITION` (reason `PROTOCOL_VERSION`).\n",
        patchbay_proto::PROTOCOL_VERSION
    );
    let _ = writeln!(w, "## Errors\n");
    let _ = writeln!(
        w,
        "Errors are gRPC statuses with a message for people and, in the status details \
         (`grpc-status-details-bin`), a `google.rpc.ErrorInfo` with domain `{}`, a `reason` \
         from this table and `metadata` naming the objects involved. Reasons are stable: \
         match on them, not on messages. A client treats an unknown reason like a missing \
         one and falls back on the code. Statuses without an `ErrorInfo` are `INTERNAL` \
         (undecodable input, server bugs), `CANCELLED`, or transport failures.\n",
        patchbay_proto::errors::DOMAIN
    );
    let _ = writeln!(w, "| Reason | Code | Meaning |\n| --- | --- | --- |");
    for r in patchbay_proto::errors::Reason::ALL {
        let code = format!("{:?}", r.code());
        let mut upper = String::new();
        for (i, c) in code.chars().enumerate() {
            if c.is_ascii_uppercase() && i > 0 {
                upper.push('_');
            }
            upper.push(c.to_ascii_uppercase());
        }
        let _ = writeln!(
            w,
            "| `{}` | `{upper}` | {} |",
            r.as_str(),
            r.description()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    let _ = writeln!(w);

    // Map entries, to print `map<K, V>` instead of their synthetic messages.
    let mut maps = BTreeMap::new();
    let index = Index::of(fds);
    for (name, m) in &index.messages {
        if m.options.as_ref().is_some_and(|o| o.map_entry()) {
            let kv: Vec<String> = m.field.iter().map(type_of).collect();
            maps.insert(name.clone(), (kv[0].clone(), kv[1].clone()));
        }
    }

    // Services first (Control, then Agent), then each file's messages and enums.
    let mut files: Vec<&FileDescriptorProto> = fds
        .file
        .iter()
        .filter(|f| f.package() == "patchbay.v1")
        .collect();
    let order = |f: &&FileDescriptorProto| match f.name() {
        "patchbay/v1/control.proto" => 0,
        "patchbay/v1/types.proto" => 1,
        _ => 2,
    };
    files.sort_by_key(order);
    for f in &files {
        let docs = Docs::of(f);
        for (i, svc) in f.service.iter().enumerate() {
            let p = vec![FILE_SERVICE, i as i32];
            let _ = writeln!(w, "## Service `patchbay.v1.{}`\n", svc.name());
            let _ = writeln!(w, "Defined in `proto/proto/{}`.\n", f.name());
            let header = docs.para(&[FILE_SYNTAX]);
            if !header.is_empty() {
                let _ = writeln!(w, "{header}\n");
            }
            let svc_doc = docs.para(&p);
            if !svc_doc.is_empty() {
                let _ = writeln!(w, "{svc_doc}\n");
            }
            for (j, m) in svc.method.iter().enumerate() {
                let stream = |yes: bool| if yes { "stream " } else { "" };
                let _ = writeln!(w, "### {}.{}\n", svc.name(), m.name());
                let _ = writeln!(
                    w,
                    "`rpc {}({}{}) returns ({}{})`: {} → {}\n",
                    m.name(),
                    stream(m.client_streaming()),
                    m.input_type().rsplit('.').next().unwrap_or_default(),
                    stream(m.server_streaming()),
                    m.output_type().rsplit('.').next().unwrap_or_default(),
                    link(m.input_type().trim_start_matches('.')),
                    link(m.output_type().trim_start_matches('.')),
                );
                let _ = writeln!(
                    w,
                    "{}\n",
                    docs.para(&[FILE_SERVICE, i as i32, SERVICE_METHOD, j as i32])
                );
            }
        }
    }
    for f in &files {
        let docs = Docs::of(f);
        if f.message_type.is_empty() && f.enum_type.is_empty() {
            continue;
        }
        let _ = writeln!(w, "## Messages and enums of `{}`\n", f.name());
        for (i, m) in f.message_type.iter().enumerate() {
            write_message(w, &docs, &maps, vec![FILE_MESSAGE, i as i32], "", m);
        }
        for (i, e) in f.enum_type.iter().enumerate() {
            write_enum(w, &docs, vec![FILE_ENUM, i as i32], "", e);
        }
    }
    s
}

fn write_message(
    w: &mut String,
    docs: &Docs,
    maps: &BTreeMap<String, (String, String)>,
    path: Vec<i32>,
    scope: &str,
    m: &DescriptorProto,
) {
    if m.options.as_ref().is_some_and(|o| o.map_entry()) {
        return;
    }
    let name = format!("{scope}{}", m.name());
    let _ = writeln!(w, "### {name}\n");
    let doc = docs.para(&path);
    if !doc.is_empty() {
        let _ = writeln!(w, "{doc}\n");
    }
    if m.field.is_empty() {
        let _ = writeln!(w, "No fields.\n");
    } else {
        let _ = writeln!(
            w,
            "| Field | Number | Type | Description |\n| --- | --- | --- | --- |"
        );
        for (i, f) in m.field.iter().enumerate() {
            let mut p = path.clone();
            p.extend([MESSAGE_FIELD, i as i32]);
            let mut desc = docs.cell(&p);
            if let Some(o) = oneof_of(m, f) {
                desc = format!("(oneof `{o}`) {desc}");
            }
            let _ = writeln!(
                w,
                "| `{}` | {} | {} | {} |",
                f.name(),
                f.number(),
                type_cell(f, maps),
                desc.trim()
            );
        }
        let _ = writeln!(w);
    }
    let reserved: BTreeSet<String> = m
        .reserved_range
        .iter()
        .map(|r| {
            if r.end() - r.start() == 1 {
                r.start().to_string()
            } else {
                format!("{}–{}", r.start(), r.end() - 1)
            }
        })
        .chain(m.reserved_name.iter().map(|n| format!("`{n}`")))
        .collect();
    if !reserved.is_empty() {
        let _ = writeln!(
            w,
            "Reserved (never reused): {}.\n",
            reserved.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    for (i, n) in m.nested_type.iter().enumerate() {
        let mut p = path.clone();
        p.extend([MESSAGE_NESTED, i as i32]);
        write_message(w, docs, maps, p, &format!("{name}."), n);
    }
    for (i, e) in m.enum_type.iter().enumerate() {
        let mut p = path.clone();
        p.extend([MESSAGE_ENUM, i as i32]);
        write_enum(w, docs, p, &format!("{name}."), e);
    }
}

fn write_enum(w: &mut String, docs: &Docs, path: Vec<i32>, scope: &str, e: &EnumDescriptorProto) {
    let _ = writeln!(w, "### {scope}{}\n", e.name());
    let doc = docs.para(&path);
    if !doc.is_empty() {
        let _ = writeln!(w, "{doc}\n");
    }
    let _ = writeln!(w, "| Value | Number | Description |\n| --- | --- | --- |");
    for (i, v) in e.value.iter().enumerate() {
        let mut p = path.clone();
        p.extend([ENUM_VALUE, i as i32]);
        let _ = writeln!(w, "| `{}` | {} | {} |", v.name(), v.number(), docs.cell(&p));
    }
    let _ = writeln!(w);
}

// ------------------------------------------------ the rules, on edited copies

mod rules {
    use super::*;
    use prost_types::descriptor_proto::ReservedRange;
    use prost_types::{FieldDescriptorProto, MethodDescriptorProto};

    fn base() -> FileDescriptorSet {
        stripped(current())
    }

    fn file<'a>(fds: &'a mut FileDescriptorSet, name: &str) -> &'a mut FileDescriptorProto {
        fds.file
            .iter_mut()
            .find(|f| f.name() == name)
            .expect("file")
    }

    fn message<'a>(fds: &'a mut FileDescriptorSet, name: &str) -> &'a mut DescriptorProto {
        fds.file
            .iter_mut()
            .flat_map(|f| f.message_type.iter_mut())
            .find(|m| m.name() == name)
            .unwrap_or_else(|| panic!("message {name}"))
    }

    fn check(edit: impl FnOnce(&mut FileDescriptorSet), expect: &str) {
        let old = base();
        let mut new = old.clone();
        edit(&mut new);
        let breaks = breaking_changes(&old, &new);
        assert!(
            breaks.iter().any(|b| b.contains(expect)),
            "expected a break containing {expect:?}, got {breaks:?}"
        );
    }

    fn allowed(edit: impl FnOnce(&mut FileDescriptorSet)) {
        let old = base();
        let mut new = old.clone();
        edit(&mut new);
        assert_eq!(breaking_changes(&old, &new), Vec::<String>::new());
    }

    #[test]
    fn unchanged_is_not_breaking() {
        allowed(|_| {});
    }

    #[test]
    fn deleting_or_changing_a_field_breaks() {
        check(
            |f| {
                message(f, "DetachRequest")
                    .field
                    .retain(|x| x.name() != "wait");
            },
            "field patchbay.v1.DetachRequest.wait (2) deleted without reserving its number",
        );
        check(
            |f| message(f, "DetachRequest").field[1].set_type(Type::Uint32),
            "DetachRequest.wait (2) changed type from bool to uint32",
        );
        check(
            |f| message(f, "DetachRequest").field[1].name = Some("block".into()),
            "DetachRequest.wait (2) renamed to block",
        );
        check(
            |f| message(f, "DetachRequest").field[1].number = Some(9),
            "DetachRequest.wait (2) deleted",
        );
        check(
            |f| message(f, "DetachRequest").field[1].set_label(Label::Repeated),
            "changed cardinality from singular to repeated",
        );
        check(
            |f| message(f, "AttachRequest").field[0].type_name = Some(".patchbay.v1.Tracer".into()),
            "changed type from patchbay.v1.TracerSpec to patchbay.v1.Tracer",
        );
        check(
            |f| message(f, "Target").field[0].oneof_index = None,
            "Target.pid (1) moved from oneof Some(\"target\") to oneof None",
        );
    }

    #[test]
    fn deleting_a_field_whose_number_is_reserved_is_allowed_but_reusing_it_breaks() {
        let reserve = |f: &mut FileDescriptorSet| {
            let m = message(f, "DetachRequest");
            m.field.retain(|x| x.name() != "wait");
            m.reserved_range.push(ReservedRange {
                start: Some(2),
                end: Some(3),
            });
        };
        allowed(reserve);
        let old = {
            let mut o = base();
            reserve(&mut o);
            o
        };
        let mut new = old.clone();
        let m = message(&mut new, "DetachRequest");
        m.reserved_range.clear();
        m.field.push(FieldDescriptorProto {
            name: Some("again".into()),
            number: Some(2),
            ..m.field[0].clone()
        });
        let breaks = breaking_changes(&old, &new);
        assert!(
            breaks
                .iter()
                .any(|b| b.contains("reuses the reserved number 2")),
            "{breaks:?}"
        );
    }

    #[test]
    fn deleting_messages_enums_services_and_rpcs_breaks() {
        check(
            |f| {
                file(f, "patchbay/v1/control.proto")
                    .message_type
                    .retain(|m| m.name() != "CountsResponse")
            },
            "message patchbay.v1.CountsResponse deleted",
        );
        check(
            |f| {
                file(f, "patchbay/v1/control.proto").service[0]
                    .method
                    .retain(|m| m.name() != "Counts")
            },
            "rpc patchbay.v1.Control.Counts deleted",
        );
        check(
            |f| file(f, "patchbay/v1/control.proto").service.clear(),
            "service patchbay.v1.Control deleted",
        );
        check(
            |f| {
                file(f, "patchbay/v1/types.proto").enum_type[0]
                    .value
                    .retain(|v| v.name() != "CALLBACK_KIND_TRACE")
            },
            "enum value patchbay.v1.CallbackKind.CALLBACK_KIND_TRACE (2) deleted",
        );
        check(
            |f| file(f, "patchbay/v1/types.proto").enum_type[0].value[2].name = Some("X".into()),
            "CALLBACK_KIND_TRACE (2) renamed to X",
        );
    }

    #[test]
    fn changing_an_rpc_signature_breaks() {
        let counts = |f: &mut FileDescriptorSet| -> MethodDescriptorProto {
            file(f, "patchbay/v1/control.proto").service[0]
                .method
                .iter()
                .find(|m| m.name() == "Counts")
                .cloned()
                .expect("Counts")
        };
        check(
            |f| {
                let mut m = counts(f);
                m.input_type = Some(".patchbay.v1.ListAgentsRequest".into());
                let svc = &mut file(f, "patchbay/v1/control.proto").service[0];
                svc.method.retain(|x| x.name() != "Counts");
                svc.method.push(m);
            },
            "changed its request from .patchbay.v1.CountsRequest to .patchbay.v1.ListAgentsRequest",
        );
        check(
            |f| {
                let svc = &mut file(f, "patchbay/v1/control.proto").service[0];
                for m in &mut svc.method {
                    if m.name() == "Counts" {
                        m.server_streaming = Some(true);
                    }
                }
            },
            "rpc patchbay.v1.Control.Counts changed streaming",
        );
    }

    #[test]
    fn additions_are_allowed() {
        allowed(|f| {
            let m = message(f, "DetachRequest");
            let mut extra = m.field[0].clone();
            extra.name = Some("new_field".into());
            extra.number = Some(99);
            m.field.push(extra);
            let ctl = file(f, "patchbay/v1/control.proto");
            let mut msg = ctl.message_type[0].clone();
            msg.name = Some("BrandNew".into());
            ctl.message_type.push(msg);
            let mut rpc = ctl.service[0].method[0].clone();
            rpc.name = Some("BrandNewRpc".into());
            ctl.service[0].method.push(rpc);
        });
    }
}
