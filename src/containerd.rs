//! containerd's config: inspect it, patch it so the CRI uses the SOCI
//! snapshotter, and undo that. Pure text-in/text-out logic on top of
//! `toml_edit`, so comments, key order, quoting and unrelated tables survive;
//! the only host access is [`config_dump`], the real validator.
//!
//! Schemas: `version = 2` (containerd 1.6/1.7, also read by 2.x) and
//! `version = 3` (containerd 2.x). A file without `version` is read by
//! containerd as version 1, which soci-node refuses to touch.
//!
//! Facts that shaped this module (checked against the real binaries):
//! - containerd 1.x replaces a whole `plugins.<id>` table from an imported
//!   file; 2.x deep-merges. An imported file without `version` is read with
//!   the main file's version. Hence [`patch_target`]: the last definer.
//! - containerd 2.x migrating a version 2 file moves `snapshotter`,
//!   `disable_snapshot_annotations` and `discard_unpacked_layers` from
//!   `[plugins."io.containerd.grpc.v1.cri".containerd]` to the images plugin
//!   only when that table also has a `runtimes` table (upstream
//!   `plugins/cri/images/plugin.go` returns early otherwise), so a patched
//!   v2 file can be silently ignored by containerd 2.x. [`dump_problems`] on
//!   the `config dump` output is what tells.

use std::path::Path;
use std::time::Duration;

use toml_edit::{ArrayOfTables, DocumentMut, InlineTable, Item, Key, Table, TableLike, Value};

/// The proxy plugin name, and the snapshotter name the CRI is pointed at.
pub const SOCI: &str = "soci";

/// Plugin ids.
pub const CRI_V2: &str = "io.containerd.grpc.v1.cri";
pub const CRI_IMAGES_V3: &str = "io.containerd.cri.v1.images";
pub const CRI_RUNTIME_V3: &str = "io.containerd.cri.v1.runtime";
pub const TRANSFER: &str = "io.containerd.transfer.v1.local";

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Schema {
    V2,
    V3,
}

impl Schema {
    pub fn version(self) -> i64 {
        match self {
            Schema::V2 => 2,
            Schema::V3 => 3,
        }
    }

    /// The CRI plugin table whose presence in a file makes that file the one
    /// to patch (see [`patch_target`]).
    pub fn cri_table(self) -> [&'static str; 2] {
        match self {
            Schema::V2 => ["plugins", CRI_V2],
            Schema::V3 => ["plugins", CRI_IMAGES_V3],
        }
    }

    /// The table holding `snapshotter`, `disable_snapshot_annotations` and
    /// `discard_unpacked_layers`.
    pub fn snapshotter_table(self) -> &'static [&'static str] {
        match self {
            Schema::V2 => &["plugins", CRI_V2, "containerd"],
            Schema::V3 => &["plugins", CRI_IMAGES_V3],
        }
    }

    /// Where the sandbox (pause) image is configured. soci-node never
    /// writes it.
    pub fn sandbox_key(self) -> &'static [&'static str] {
        match self {
            Schema::V2 => &["plugins", CRI_V2, "sandbox_image"],
            Schema::V3 => &["plugins", CRI_IMAGES_V3, "pinned_images", "sandbox"],
        }
    }

    /// Plugin ids in `disabled_plugins` that switch the CRI off. containerd
    /// matches full ids (a short `cri` only means something in version 1).
    pub fn cri_plugin_ids(self) -> &'static [&'static str] {
        match self {
            Schema::V2 => &[CRI_V2],
            Schema::V3 => &[CRI_V2, CRI_IMAGES_V3, CRI_RUNTIME_V3],
        }
    }
}

pub struct PatchOptions {
    /// Proxy plugin socket, e.g. /run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock
    pub address: String,
    /// Exports root, e.g. /var/lib/soci-snapshotter-grpc
    pub root: String,
    /// Some("linux/amd64") when containerd >= 2.1: the transfer service's
    /// `unpack_config` for that platform uses soci, and the proxy plugin
    /// exports `enable_remote_snapshot_annotations = "true"`.
    pub transfer_platform: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Inspection {
    pub schema: Schema,
    pub cri_snapshotter: Option<String>,
    pub sandbox_image: Option<String>,
    pub imports: Vec<String>,
    pub has_soci_proxy: bool,
    pub cri_disabled: bool,
}

#[derive(Debug, Clone)]
pub struct Patched {
    pub text: String,
    pub changed: bool,
    pub schema: Schema,
    pub previous_snapshotter: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    #[error("{path}:{line}:{column}: not valid TOML: {message}; containerd will not start with this file either: fix it (containerd --config {path} config dump shows the error) — soci-node leaves it untouched")]
    Parse {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Unsupported { path: String, message: String },
    #[error("{path}: {message}")]
    Conflict { path: String, message: String },
}

// ---------------------------------------------------------------------------
// Public entry points

/// What the file says about the CRI and SOCI, without changing anything.
/// Also works on `containerd config dump` output.
pub fn inspect(path: &str, text: &str) -> Result<Inspection, ContainerdError> {
    let doc = parse(path, text)?;
    let schema = schema_of(path, &doc, None)?;
    let root = doc.as_table() as &dyn TableLike;
    let imports = match root.get("imports") {
        None => Vec::new(),
        Some(item) => match item.as_array() {
            Some(a) if a.iter().all(|v| v.is_str()) => {
                a.iter().filter_map(|v| v.as_str().map(String::from)).collect()
            }
            _ => {
                return Err(ContainerdError::Conflict {
                    path: path.to_string(),
                    message: "`imports` must be an array of file paths (strings); fix it — soci-node leaves the file untouched".to_string(),
                })
            }
        },
    };
    let disabled: Vec<&str> = root
        .get("disabled_plugins")
        .and_then(Item::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    Ok(Inspection {
        schema,
        cri_snapshotter: snapshotter_of(&doc, schema),
        sandbox_image: lookup_str(root, schema.sandbox_key()),
        imports,
        has_soci_proxy: lookup(root, &["proxy_plugins", SOCI])
            .and_then(Item::as_table_like)
            .is_some(),
        cri_disabled: schema
            .cri_plugin_ids()
            .iter()
            .any(|id| disabled.contains(id)),
    })
}

/// Point the CRI at the SOCI snapshotter and declare the proxy plugin.
/// Idempotent: patching the output again returns it byte for byte with
/// `changed == false`.
pub fn patch(path: &str, text: &str, opts: &PatchOptions) -> Result<Patched, ContainerdError> {
    patch_impl(path, text, opts, None)
}

/// [`patch`] for an imported file, which containerd reads with the main
/// file's schema when it has no `version` of its own.
pub fn patch_with_schema(
    path: &str,
    text: &str,
    opts: &PatchOptions,
    main_schema: Schema,
) -> Result<Patched, ContainerdError> {
    patch_impl(path, text, opts, Some(main_schema))
}

/// Fallback: if the CRI snapshotter is currently "soci", set it to `restore`
/// (normally "overlayfs"); leave everything else (proxy plugin may stay:
/// harmless). Unchanged text otherwise.
///
/// Transfer-service `unpack_config` entries that use soci are pointed at
/// `restore` too (only they are touched): with SOCI down they would make
/// every transfer-service pull (ctr, nerdctl) fail.
pub fn unpatch(path: &str, text: &str, restore: &str) -> Result<Patched, ContainerdError> {
    unpatch_impl(path, text, &Restore::snapshotter_only(restore), None)
}

/// What a fallback puts back, taken from the original file (the backup).
#[derive(Debug, Clone, PartialEq)]
pub struct Restore {
    pub snapshotter: String,
    pub disable_snapshot_annotations: KeyRestore,
    /// The original had no `[proxy_plugins.soci]`: remove ours.
    pub drop_soci_proxy: bool,
    /// The original had a `[proxy_plugins]` table (kept even when empty).
    pub had_proxy_table: bool,
    /// The original's transfer-service table: whether it existed and the
    /// platforms of its unpack_config entries. soci entries for other
    /// platforms were added by soci-node and are removed. None: unknown,
    /// soci entries are pointed back at `snapshotter` instead.
    pub original_transfer: Option<(bool, Vec<String>)>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KeyRestore {
    Leave,
    Set(bool),
    Remove,
}

impl Restore {
    pub fn snapshotter_only(snapshotter: &str) -> Restore {
        Restore {
            snapshotter: snapshotter.to_string(),
            disable_snapshot_annotations: KeyRestore::Leave,
            drop_soci_proxy: false,
            had_proxy_table: true,
            original_transfer: None,
        }
    }

    /// Everything soci-node set, back to what `original` (the file before
    /// soci-node first changed it) says. Without an original only the
    /// snapshotter goes back (to containerd's default) and nothing is
    /// removed: the SOCI settings may be someone else's (nodeadm).
    pub fn from_original(path: &str, original: Option<&str>) -> Restore {
        let Some(doc) = original.and_then(|t| parse(path, t).ok()) else {
            return Restore::snapshotter_only("overlayfs");
        };
        let Ok(schema) = schema_of(path, &doc, None) else {
            return Restore::snapshotter_only("overlayfs");
        };
        let snapshotter = snapshotter_of(&doc, schema)
            .filter(|s| s != SOCI)
            .unwrap_or_else(|| "overlayfs".to_string());
        let mut key = schema.snapshotter_table().to_vec();
        key.push("disable_snapshot_annotations");
        let dsa = match lookup(doc.as_table(), &key).and_then(Item::as_bool) {
            Some(b) => KeyRestore::Set(b),
            None => KeyRestore::Remove,
        };
        Restore {
            snapshotter,
            disable_snapshot_annotations: dsa,
            drop_soci_proxy: lookup(doc.as_table(), &["proxy_plugins", SOCI]).is_none(),
            had_proxy_table: doc.get("proxy_plugins").is_some(),
            original_transfer: Some((
                lookup(doc.as_table(), &["plugins", TRANSFER]).is_some(),
                unpack_entries(doc.as_table())
                    .into_iter()
                    .filter_map(|(p, _)| p)
                    .collect(),
            )),
        }
    }
}

/// Fallback with everything soci-node set put back as `restore` says.
pub fn unpatch_to(
    path: &str,
    text: &str,
    restore: &Restore,
    main_schema: Schema,
) -> Result<Patched, ContainerdError> {
    unpatch_impl(path, text, restore, Some(main_schema))
}

/// [`unpatch`] for an imported file without its own `version`.
pub fn unpatch_with_schema(
    path: &str,
    text: &str,
    restore: &str,
    main_schema: Schema,
) -> Result<Patched, ContainerdError> {
    unpatch_impl(
        path,
        text,
        &Restore::snapshotter_only(restore),
        Some(main_schema),
    )
}

/// Which file among main + imported files holds the CRI table that must be
/// patched: the LAST file in containerd's merge order (main first, then
/// imports in order) that defines the CRI table (v2:
/// `plugins."io.containerd.grpc.v1.cri"`; v3:
/// `plugins.'io.containerd.cri.v1.images'`), else the main file.
/// containerd 1.x replaces a whole plugin table from an import, 2.x
/// deep-merges; patching the last definer is right for both. An imported
/// file is read with its own `version`, or the main file's without one.
pub fn patch_target(
    main_path: &str,
    main_text: &str,
    imports: &[(String, String)],
) -> Result<String, ContainerdError> {
    let main = parse(main_path, main_text)?;
    let main_schema = schema_of(main_path, &main, None)?;
    let mut target = main_path.to_string();
    for (path, text) in imports {
        let doc = parse(path, text)?;
        let schema = schema_of(path, &doc, Some(main_schema))?;
        if lookup(doc.as_table(), &schema.cri_table()).is_some() {
            target = path.clone();
        }
    }
    Ok(target)
}

/// Run `containerd --config F config dump` and return the dump text (the
/// real validator). Timeout given by caller.
pub fn config_dump(
    containerd_bin: &Path,
    config: &Path,
    timeout: Duration,
) -> Result<String, crate::run::RunError> {
    let config = config.to_string_lossy();
    crate::run::run(
        containerd_bin,
        &["--config", config.as_ref(), "config", "dump"],
        timeout,
    )
    .map(|o| o.stdout)
}

/// What, in a `containerd config dump` output, says containerd would NOT run
/// the CRI on SOCI as [`patch`] configured it. Empty when all is well.
/// The dump is what containerd really uses after imports and migrations
/// (see the module docs for a v2-on-2.x case that only this catches).
pub fn dump_problems(dump: &str, opts: &PatchOptions) -> Vec<String> {
    let mut out = Vec::new();
    let doc = match parse("config dump", dump) {
        Ok(d) => d,
        Err(e) => return vec![e.to_string()],
    };
    let schema = match schema_of("config dump", &doc, None) {
        Ok(s) => s,
        Err(e) => return vec![e.to_string()],
    };
    let root = doc.as_table() as &dyn TableLike;
    let table = schema.snapshotter_table().join(".");
    match snapshotter_of(&doc, schema) {
        Some(s) if s == SOCI => {}
        other => out.push(format!(
            "CRI snapshotter ({table}.snapshotter) is {}, not \"{SOCI}\"",
            show(other.as_deref())
        )),
    }
    let mut key = schema.snapshotter_table().to_vec();
    key.push("disable_snapshot_annotations");
    match lookup(root, &key).and_then(Item::as_bool) {
        Some(false) => {}
        other => out.push(format!(
            "{table}.disable_snapshot_annotations is {}, not false: SOCI gets no lazy-loading annotations",
            other.map_or("missing".to_string(), |b| b.to_string())
        )),
    }
    let mut want = vec![
        (&["proxy_plugins", SOCI, "type"][..], "snapshot"),
        (
            &["proxy_plugins", SOCI, "address"][..],
            opts.address.as_str(),
        ),
    ];
    // containerd 1.6 has no proxy plugin exports: its dump shows none. Later
    // versions always show the table (containerd adds `address` to it).
    if lookup(root, &["proxy_plugins", SOCI, "exports"]).is_some() {
        want.push((
            &["proxy_plugins", SOCI, "exports", "root"][..],
            opts.root.as_str(),
        ));
    }
    for (k, v) in want {
        let got = lookup_str(root, k);
        if got.as_deref() != Some(v) {
            out.push(format!(
                "{} is {}, not \"{v}\"",
                k.join("."),
                show(got.as_deref())
            ));
        }
    }
    if let Some(platform) = &opts.transfer_platform {
        let k = [
            "proxy_plugins",
            SOCI,
            "exports",
            "enable_remote_snapshot_annotations",
        ];
        let got = lookup_str(root, &k);
        if got.as_deref() != Some("true") {
            out.push(format!(
                "{} is {}, not \"true\"",
                k.join("."),
                show(got.as_deref())
            ));
        }
        let entries = unpack_entries(root);
        if !entries
            .iter()
            .any(|(p, s)| p.as_deref() == Some(platform) && s.as_deref() == Some(SOCI))
        {
            out.push(format!(
                "plugins.\"{TRANSFER}\".unpack_config has no entry with platform \"{platform}\" and snapshotter \"{SOCI}\""
            ));
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Parsing and reading

fn parse(path: &str, text: &str) -> Result<DocumentMut, ContainerdError> {
    text.parse::<DocumentMut>().map_err(|e| {
        let offset = e.span().map(|s| s.start).unwrap_or(0).min(text.len());
        let (line, column) = line_col(text, offset);
        let message = e
            .message()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(": ");
        ContainerdError::Parse {
            path: path.to_string(),
            line,
            column,
            message,
        }
    })
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset;
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

const REGENERATE: &str = "regenerate it with `containerd config default` (containerd 1.x writes version 2, 2.x writes version 3) and carry your settings over — soci-node leaves the file untouched";

/// The file's schema from its `version`; `fallback` (the main file's schema)
/// for an imported file without one.
fn schema_of(
    path: &str,
    doc: &DocumentMut,
    fallback: Option<Schema>,
) -> Result<Schema, ContainerdError> {
    let unsupported = |message: String| ContainerdError::Unsupported {
        path: path.to_string(),
        message,
    };
    match doc.as_table().get("version") {
        None => fallback.ok_or_else(|| {
            unsupported(format!(
                "containerd config version 1 is not supported (the file has no `version` key, so containerd reads it as version 1); {REGENERATE}"
            ))
        }),
        Some(item) => match item.as_integer() {
            Some(2) => Ok(Schema::V2),
            Some(3) => Ok(Schema::V3),
            Some(1) => Err(unsupported(format!(
                "containerd config version 1 is not supported; {REGENERATE}"
            ))),
            Some(n) => Err(unsupported(format!(
                "containerd config version {n} is not supported (soci-node knows versions 2 and 3); {REGENERATE}"
            ))),
            None => Err(unsupported(format!(
                "`version` must be an integer (2 or 3), found `{}`; {REGENERATE}",
                item.to_string().trim()
            ))),
        },
    }
}

fn lookup<'a>(table: &'a dyn TableLike, path: &[&str]) -> Option<&'a Item> {
    let (first, rest) = path.split_first()?;
    let item = table.get(first)?;
    if rest.is_empty() {
        Some(item)
    } else {
        lookup(item.as_table_like()?, rest)
    }
}

fn lookup_str(table: &dyn TableLike, path: &[&str]) -> Option<String> {
    lookup(table, path)?.as_str().map(String::from)
}

fn snapshotter_of(doc: &DocumentMut, schema: Schema) -> Option<String> {
    let mut key = schema.snapshotter_table().to_vec();
    key.push("snapshotter");
    lookup_str(doc.as_table(), &key)
}

/// (platform, snapshotter) of each transfer-service unpack_config entry.
fn unpack_entries(root: &dyn TableLike) -> Vec<(Option<String>, Option<String>)> {
    let field = |t: &dyn TableLike, k: &str| t.get(k).and_then(Item::as_str).map(String::from);
    match lookup(root, &["plugins", TRANSFER, "unpack_config"]) {
        Some(Item::ArrayOfTables(a)) => a
            .iter()
            .map(|t| (field(t, "platform"), field(t, "snapshotter")))
            .collect(),
        Some(Item::Value(Value::Array(a))) => a
            .iter()
            .filter_map(Value::as_inline_table)
            .map(|t| (field(t, "platform"), field(t, "snapshotter")))
            .collect(),
        _ => Vec::new(),
    }
}

fn show(v: Option<&str>) -> String {
    v.map_or("missing".to_string(), |s| format!("\"{s}\""))
}

// ---------------------------------------------------------------------------
// Editing

fn patch_impl(
    path: &str,
    text: &str,
    opts: &PatchOptions,
    fallback: Option<Schema>,
) -> Result<Patched, ContainerdError> {
    let mut doc = parse(path, text)?;
    let schema = schema_of(path, &doc, fallback)?;
    let previous_snapshotter = snapshotter_of(&doc, schema);
    let mut ed = Editor::new(path, &doc, schema);

    // CRI first, then the transfer service, then the proxy plugin: in a file
    // that has none of them, that is the order they are appended in.
    {
        let mut t = ed.descend(
            Node::Std(doc.as_table_mut()),
            schema.snapshotter_table(),
            &implicit_parents(schema.snapshotter_table().len()),
        )?;
        ed.set(&mut t, "snapshotter", Want::Str(SOCI))?;
        ed.set(&mut t, "disable_snapshot_annotations", Want::Bool(false))?;
        ed.set(&mut t, "discard_unpacked_layers", Want::Bool(false))?;
    }
    if let Some(platform) = &opts.transfer_platform {
        let t = ed.descend(
            Node::Std(doc.as_table_mut()),
            &["plugins", TRANSFER],
            &[true, true],
        )?;
        ed.ensure_unpack(t, platform)?;
    }
    {
        let mut p = ed.descend(
            Node::Std(doc.as_table_mut()),
            &["proxy_plugins", SOCI],
            &[true, false],
        )?;
        ed.set(&mut p, "type", Want::Str("snapshot"))?;
        ed.set(&mut p, "address", Want::Str(&opts.address))?;
        let mut ex = ed.child(p, "exports", "proxy_plugins.soci.exports", false)?;
        ed.set(&mut ex, "root", Want::Str(&opts.root))?;
        if opts.transfer_platform.is_some() {
            ed.set(
                &mut ex,
                "enable_remote_snapshot_annotations",
                Want::Str("true"),
            )?;
        }
    }
    finish(path, text, doc, ed.modified, schema, previous_snapshotter)
}

fn unpatch_impl(
    path: &str,
    text: &str,
    restore: &Restore,
    fallback: Option<Schema>,
) -> Result<Patched, ContainerdError> {
    let mut doc = parse(path, text)?;
    let schema = schema_of(path, &doc, fallback)?;
    let previous_snapshotter = snapshotter_of(&doc, schema);
    let mut removed = false;
    if restore.drop_soci_proxy {
        if let Some(pp) = doc
            .get_mut("proxy_plugins")
            .and_then(Item::as_table_like_mut)
        {
            removed = pp.remove(SOCI).is_some();
            if removed && pp.is_empty() && !restore.had_proxy_table {
                doc.remove("proxy_plugins");
            }
        }
    }
    if let Some((had_table, platforms)) = &restore.original_transfer {
        removed |= remove_added_unpack_entries(&mut doc, *had_table, platforms);
    }
    let mut ed = Editor::new(path, &doc, schema);
    if previous_snapshotter.as_deref() == Some(SOCI) {
        let mut t = ed.descend(
            Node::Std(doc.as_table_mut()),
            schema.snapshotter_table(),
            &implicit_parents(schema.snapshotter_table().len()),
        )?;
        ed.set(&mut t, "snapshotter", Want::Str(&restore.snapshotter))?;
        match restore.disable_snapshot_annotations {
            KeyRestore::Leave => {}
            KeyRestore::Set(b) => ed.set(&mut t, "disable_snapshot_annotations", Want::Bool(b))?,
            KeyRestore::Remove => {
                if let Node::Std(t) = &mut t {
                    removed |= t.remove("disable_snapshot_annotations").is_some();
                }
            }
        }
    }
    ed.modified |= removed;
    let uses_soci = unpack_entries(doc.as_table())
        .iter()
        .any(|(_, s)| s.as_deref() == Some(SOCI));
    if uses_soci {
        let t = ed.descend(
            Node::Std(doc.as_table_mut()),
            &["plugins", TRANSFER],
            &[true, true],
        )?;
        ed.restore_unpack(t, &restore.snapshotter)?;
    }
    finish(path, text, doc, ed.modified, schema, previous_snapshotter)
}

/// Remove `[[unpack_config]]` entries that use soci for a platform the
/// original had no entry for (soci-node added them), then the tables that
/// became empty and were not in the original. True when anything went.
fn remove_added_unpack_entries(
    doc: &mut DocumentMut,
    had_table: bool,
    platforms: &[String],
) -> bool {
    let Some(transfer) = doc
        .get_mut("plugins")
        .and_then(Item::as_table_like_mut)
        .and_then(|p| p.get_mut(TRANSFER))
        .and_then(Item::as_table_like_mut)
    else {
        return false;
    };
    let mut removed = false;
    if let Some(Item::ArrayOfTables(aot)) = transfer.get_mut("unpack_config") {
        let mut i = 0;
        while i < aot.len() {
            let t = aot.get(i).expect("index in range");
            let added = t.get("snapshotter").and_then(Item::as_str) == Some(SOCI)
                && t.get("platform")
                    .and_then(Item::as_str)
                    .is_some_and(|p| !platforms.iter().any(|o| o == p));
            if added {
                aot.remove(i);
                removed = true;
            } else {
                i += 1;
            }
        }
        if aot.is_empty() {
            transfer.remove("unpack_config");
        }
    }
    if removed && !had_table && transfer.is_empty() {
        if let Some(p) = doc.get_mut("plugins").and_then(Item::as_table_like_mut) {
            p.remove(TRANSFER);
        }
    }
    removed
}

/// Render, and check the result parses and reads back as intended before
/// anyone writes it.
fn finish(
    path: &str,
    text: &str,
    doc: DocumentMut,
    modified: bool,
    schema: Schema,
    previous_snapshotter: Option<String>,
) -> Result<Patched, ContainerdError> {
    let out = if modified {
        keep_header_spelling(text, &doc.to_string())
    } else {
        text.to_string()
    };
    if let Err(e) = out.parse::<DocumentMut>() {
        return Err(ContainerdError::Conflict {
            path: path.to_string(),
            message: format!(
                "the edited file would not be valid TOML ({}); this is a soci-node bug: please report it with the file — soci-node leaves the file untouched",
                e.message().trim()
            ),
        });
    }
    Ok(Patched {
        changed: out != text,
        text: out,
        schema,
        previous_snapshotter,
    })
}

/// toml_edit keeps one spelling per key, so re-rendering a file that writes
/// `[plugins.'io.containerd.cri.v1.images']` and later
/// `[plugins."io.containerd.cri.v1.images".registry]` (nodeadm's template
/// does) would requote the second header. Put back every original header
/// line whose key path is still there (array-of-tables entries in order).
fn keep_header_spelling(original: &str, rendered: &str) -> String {
    use std::collections::{HashMap, VecDeque};
    let mut std_headers: HashMap<Vec<String>, &str> = HashMap::new();
    let mut aot_headers: HashMap<Vec<String>, VecDeque<&str>> = HashMap::new();
    for line in original.lines() {
        match header_path(line) {
            Some((false, path)) => {
                std_headers.insert(path, line);
            }
            Some((true, path)) => aot_headers.entry(path).or_default().push_back(line),
            None => {}
        }
    }
    let mut out = String::with_capacity(rendered.len());
    for chunk in rendered.split_inclusive('\n') {
        let body = chunk.trim_end_matches('\n').trim_end_matches('\r');
        let eol = &chunk[body.len()..];
        let original_line = match header_path(body) {
            Some((false, path)) => std_headers.get(&path).copied(),
            Some((true, path)) => aot_headers.get_mut(&path).and_then(VecDeque::pop_front),
            None => None,
        };
        out.push_str(original_line.unwrap_or(body));
        out.push_str(eol);
    }
    out
}

/// `(is_array_of_tables, key path)` of a table header line.
fn header_path(line: &str) -> Option<(bool, Vec<String>)> {
    let t = line.trim_start();
    let (aot, rest) = match t.strip_prefix("[[") {
        Some(r) => (true, r),
        None => (false, t.strip_prefix('[')?),
    };
    let mut quote: Option<char> = None;
    let mut escaped = false;
    let mut end = None;
    for (i, c) in rest.char_indices() {
        match quote {
            Some('"') => {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == '"' {
                    quote = None;
                }
            }
            Some(_) => {
                if c == '\'' {
                    quote = None;
                }
            }
            None => match c {
                '"' | '\'' => quote = Some(c),
                ']' => {
                    end = Some(i);
                    break;
                }
                _ => {}
            },
        }
    }
    let end = end?;
    let close = if aot { "]]" } else { "]" };
    let after = rest[end..].strip_prefix(close)?.trim();
    if !(after.is_empty() || after.starts_with('#')) {
        return None;
    }
    let keys = Key::parse(&rest[..end]).ok()?;
    Some((aot, keys.iter().map(|k| k.get().to_string()).collect()))
}

/// All tables on the path to a leaf table are created implicit (no header
/// of their own) except the leaf.
fn implicit_parents(len: usize) -> Vec<bool> {
    (0..len).map(|i| i + 1 < len).collect()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Quote {
    Single,
    Double,
}

#[derive(Clone, Copy)]
enum Want<'a> {
    Str(&'a str),
    Bool(bool),
}

impl Want<'_> {
    fn matches(&self, v: &Value) -> bool {
        match self {
            Want::Str(s) => v.as_str() == Some(s),
            Want::Bool(b) => v.as_bool() == Some(*b),
        }
    }

    fn to_value(self, quote: Quote) -> Value {
        match self {
            Want::Bool(b) => Value::from(b),
            Want::Str(s) => string_value(s, quote),
        }
    }
}

fn string_value(s: &str, quote: Quote) -> Value {
    if quote == Quote::Single && !s.contains(['\'', '\n', '\r']) {
        if let Ok(v) = format!("'{s}'").parse::<Value>() {
            return v;
        }
    }
    Value::from(s)
}

/// A table being edited: a standard (header or dotted) table or an inline
/// one.
enum Node<'a> {
    Std(&'a mut Table),
    Inline(&'a mut InlineTable),
}

/// Editing context: the document's conventions, and whether anything changed.
struct Editor {
    path: String,
    value_quote: Quote,
    key_quote: Quote,
    /// Extra indentation of keys relative to their table header, as the
    /// document does it ("" for flat files, "  " for `config default` of 2.x).
    step: String,
    /// Past every table position in the document: new tables placed at the
    /// end get positions from here on.
    end_position: usize,
    modified: bool,
}

impl Editor {
    fn new(path: &str, doc: &DocumentMut, schema: Schema) -> Editor {
        let mut counts = QuoteCounts::default();
        counts.table(doc.as_table());
        let default = match schema {
            Schema::V2 => Quote::Double,
            Schema::V3 => Quote::Single,
        };
        Editor {
            path: path.to_string(),
            value_quote: counts.values.pick(default),
            key_quote: counts.keys.pick(default),
            step: find_step(doc.as_table()).unwrap_or_default(),
            end_position: max_position(doc.as_table()).unwrap_or(0),
            modified: false,
        }
    }

    fn conflict(&self, key: &str, found: &Item, expected: &str) -> ContainerdError {
        ContainerdError::Conflict {
            path: self.path.clone(),
            message: format!(
                "`{key}` is {}, but containerd expects {expected} there and soci-node must edit it; fix or remove `{key}` (see `containerd config default` for its shape) — soci-node leaves the file untouched",
                describe(found)
            ),
        }
    }

    fn key(&self, name: &str) -> Key {
        let bare = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if bare {
            return Key::new(name);
        }
        let repr = match self.key_quote {
            Quote::Single if !name.contains(['\'', '\n', '\r']) => format!("'{name}'"),
            _ => format!("\"{}\"", name.replace('\\', "\\\\").replace('"', "\\\"")),
        };
        match Key::parse(&repr) {
            Ok(mut keys) if keys.len() == 1 => {
                let mut k = keys.remove(0);
                k.leaf_decor_mut().clear();
                k.dotted_decor_mut().clear();
                k
            }
            _ => Key::new(name),
        }
    }

    /// Walk (creating as needed) `path` from `node`; `implicit[i]` says
    /// whether a created table at depth i gets no header of its own.
    fn descend<'a>(
        &mut self,
        mut node: Node<'a>,
        path: &[&str],
        implicit: &[bool],
    ) -> Result<Node<'a>, ContainerdError> {
        for (i, name) in path.iter().enumerate() {
            let shown = dotted_name(&path[..=i]);
            node = self.child_of(node, name, &shown, implicit[i], i == 0)?;
        }
        Ok(node)
    }

    /// The table `name` inside `node`, created if missing: inside an inline
    /// table as an inline table, otherwise as a standard table placed after
    /// its siblings and indented like them.
    fn child<'a>(
        &mut self,
        node: Node<'a>,
        name: &str,
        shown: &str,
        implicit: bool,
    ) -> Result<Node<'a>, ContainerdError> {
        self.child_of(node, name, shown, implicit, false)
    }

    fn child_of<'a>(
        &mut self,
        node: Node<'a>,
        name: &str,
        shown: &str,
        implicit: bool,
        parent_is_root: bool,
    ) -> Result<Node<'a>, ContainerdError> {
        match node {
            Node::Std(t) => {
                if !t.contains_key(name) {
                    let mut nt = Table::new();
                    nt.set_implicit(implicit);
                    if !implicit {
                        let indent = self.child_header_indent(t, parent_is_root);
                        nt.decor_mut().set_prefix(format!("\n{indent}"));
                    }
                    nt.set_position(self.new_position(t, parent_is_root));
                    t.insert_formatted(&self.key(name), Item::Table(nt));
                    self.modified = true;
                }
                let item = t.get_mut(name).expect("present");
                match item {
                    Item::Table(c) => Ok(Node::Std(c)),
                    Item::Value(Value::InlineTable(c)) => Ok(Node::Inline(c)),
                    other => Err(self.conflict(shown, other, "a table")),
                }
            }
            Node::Inline(t) => {
                if !t.contains_key(name) {
                    append_inline(t, &self.key(name), Value::InlineTable(InlineTable::new()));
                    self.modified = true;
                }
                let value = t.get_mut(name).expect("present");
                match value {
                    Value::InlineTable(c) => Ok(Node::Inline(c)),
                    other => Err(self.conflict(shown, &Item::Value(other.clone()), "a table")),
                }
            }
        }
    }

    /// Set `key` to `want` in `node`, keeping the old value's decor (spacing,
    /// trailing comment) and quote style; nothing at all if already so.
    fn set(
        &mut self,
        node: &mut Node<'_>,
        key: &str,
        want: Want<'_>,
    ) -> Result<(), ContainerdError> {
        let value_quote = self.value_quote;
        match node {
            Node::Std(t) => match t.get_mut(key) {
                Some(Item::Value(v)) => {
                    if !want.matches(v) {
                        replace_value(v, want, value_quote);
                        self.modified = true;
                    }
                    Ok(())
                }
                None | Some(Item::None) => {
                    let indent = if t.is_dotted() {
                        None
                    } else {
                        Some(
                            kv_indent(t)
                                .unwrap_or_else(|| format!("{}{}", header_indent(t), self.step)),
                        )
                    };
                    t.insert_formatted(&self.key(key), Item::Value(want.to_value(value_quote)));
                    if let (Some(indent), Some(mut k)) = (indent, t.key_mut(key)) {
                        k.leaf_decor_mut().set_prefix(indent);
                    }
                    self.modified = true;
                    Ok(())
                }
                Some(other) => {
                    let other = other.clone();
                    Err(self.conflict(key, &other, "a value"))
                }
            },
            Node::Inline(t) => {
                match t.get_mut(key) {
                    Some(v) => {
                        if !want.matches(v) {
                            replace_value(v, want, value_quote);
                            self.modified = true;
                        }
                    }
                    None => {
                        append_inline(t, &self.key(key), want.to_value(value_quote));
                        self.modified = true;
                    }
                }
                Ok(())
            }
        }
    }

    /// Make the transfer service unpack `platform` with soci: update the
    /// entry for that platform or append one.
    fn ensure_unpack(&mut self, node: Node<'_>, platform: &str) -> Result<(), ContainerdError> {
        let shown = format!("plugins.\"{TRANSFER}\".unpack_config");
        match node {
            Node::Std(t) => {
                if !t.contains_key("unpack_config") {
                    let indent = self.child_header_indent(t, false);
                    let mut entry = Table::new();
                    entry.decor_mut().set_prefix(format!("\n{indent}"));
                    entry.set_position(self.new_position(t, false));
                    let mut aot = ArrayOfTables::new();
                    aot.push(entry);
                    t.insert_formatted(&self.key("unpack_config"), Item::ArrayOfTables(aot));
                    self.modified = true;
                    let Some(Item::ArrayOfTables(aot)) = t.get_mut("unpack_config") else {
                        unreachable!("just inserted");
                    };
                    let mut e = Node::Std(aot.get_mut(0).expect("one entry"));
                    self.set(&mut e, "platform", Want::Str(platform))?;
                    return self.set(&mut e, "snapshotter", Want::Str(SOCI));
                }
                match t.get_mut("unpack_config").expect("present") {
                    Item::ArrayOfTables(aot) => self.unpack_in_aot(aot, platform),
                    Item::Value(Value::Array(arr)) => self.unpack_in_array(arr, platform, &shown),
                    other => {
                        let other = other.clone();
                        Err(self.conflict(&shown, &other, "an array of tables"))
                    }
                }
            }
            Node::Inline(t) => match t.get_mut("unpack_config") {
                None => {
                    let mut entry = InlineTable::new();
                    entry.insert("platform", string_value(platform, self.value_quote));
                    entry.insert("snapshotter", string_value(SOCI, self.value_quote));
                    let mut arr = toml_edit::Array::new();
                    arr.push(Value::InlineTable(entry));
                    t.insert("unpack_config", Value::Array(arr));
                    self.modified = true;
                    Ok(())
                }
                Some(Value::Array(arr)) => self.unpack_in_array(arr, platform, &shown),
                Some(other) => {
                    let other = Item::Value(other.clone());
                    Err(self.conflict(&shown, &other, "an array of tables"))
                }
            },
        }
    }

    fn unpack_in_aot(
        &mut self,
        aot: &mut ArrayOfTables,
        platform: &str,
    ) -> Result<(), ContainerdError> {
        let found = aot
            .iter()
            .position(|t| t.get("platform").and_then(Item::as_str) == Some(platform));
        let idx = match found {
            Some(i) => i,
            None => {
                let indent = aot.iter().last().map(header_indent).unwrap_or_default();
                let mut entry = Table::new();
                entry.decor_mut().set_prefix(format!("\n{indent}"));
                if let Some(pos) = aot.iter().filter_map(max_position).max() {
                    entry.set_position(pos);
                }
                aot.push(entry);
                self.modified = true;
                let mut e = Node::Std(aot.get_mut(aot.len() - 1).expect("pushed"));
                self.set(&mut e, "platform", Want::Str(platform))?;
                return self.set(&mut e, "snapshotter", Want::Str(SOCI));
            }
        };
        let mut e = Node::Std(aot.get_mut(idx).expect("found"));
        self.set(&mut e, "snapshotter", Want::Str(SOCI))
    }

    fn unpack_in_array(
        &mut self,
        arr: &mut toml_edit::Array,
        platform: &str,
        shown: &str,
    ) -> Result<(), ContainerdError> {
        if let Some(bad) = arr.iter().find(|v| !v.is_inline_table()) {
            let bad = Item::Value(bad.clone());
            return Err(self.conflict(
                &format!("{shown}[..]"),
                &bad,
                "a table ({ platform = \"...\", snapshotter = \"...\" })",
            ));
        }
        let found = arr.iter().position(|v| {
            v.as_inline_table()
                .and_then(|t| t.get("platform"))
                .and_then(Value::as_str)
                == Some(platform)
        });
        match found {
            Some(i) => {
                let Some(Value::InlineTable(t)) = arr.get_mut(i) else {
                    unreachable!("checked above");
                };
                let mut e = Node::Inline(t);
                self.set(&mut e, "snapshotter", Want::Str(SOCI))
            }
            None => {
                let mut entry = InlineTable::new();
                entry.insert("platform", string_value(platform, self.value_quote));
                entry.insert("snapshotter", string_value(SOCI, self.value_quote));
                arr.push(Value::InlineTable(entry));
                self.modified = true;
                Ok(())
            }
        }
    }

    /// Point every unpack_config entry that uses soci at `restore`.
    fn restore_unpack(&mut self, node: Node<'_>, restore: &str) -> Result<(), ContainerdError> {
        match node {
            Node::Std(t) => match t.get_mut("unpack_config") {
                Some(Item::ArrayOfTables(aot)) => {
                    for t in aot.iter_mut() {
                        if t.get("snapshotter").and_then(Item::as_str) == Some(SOCI) {
                            self.set(&mut Node::Std(t), "snapshotter", Want::Str(restore))?;
                        }
                    }
                    Ok(())
                }
                Some(Item::Value(Value::Array(arr))) => self.restore_in_array(arr, restore),
                _ => Ok(()),
            },
            Node::Inline(t) => match t.get_mut("unpack_config") {
                Some(Value::Array(arr)) => self.restore_in_array(arr, restore),
                _ => Ok(()),
            },
        }
    }

    fn restore_in_array(
        &mut self,
        arr: &mut toml_edit::Array,
        restore: &str,
    ) -> Result<(), ContainerdError> {
        for v in arr.iter_mut() {
            if let Value::InlineTable(t) = v {
                if t.get("snapshotter").and_then(Value::as_str) == Some(SOCI) {
                    self.set(&mut Node::Inline(t), "snapshotter", Want::Str(restore))?;
                }
            }
        }
        Ok(())
    }

    /// Document position for a new table inside `parent`: right after the
    /// last table already under `parent`, or at the end of the file when
    /// `parent` is the root or has no table of its own (dotted keys). The
    /// renderer orders tables by position, ties in tree order.
    fn new_position(&mut self, parent: &Table, parent_is_root: bool) -> usize {
        let under = if parent_is_root {
            None
        } else {
            max_position(parent)
        };
        match under {
            Some(p) => p,
            None => {
                self.end_position += 1;
                self.end_position
            }
        }
    }

    /// Header indentation for a new table inside `parent`: like an existing
    /// sibling table's, else like the parent's keys, else the parent's header
    /// plus one step; flush left under a header-less parent.
    fn child_header_indent(&self, parent: &Table, parent_is_root: bool) -> String {
        let sibling = parent.iter().find_map(|(_, item)| match item {
            Item::Table(t) if !t.is_dotted() && !t.is_implicit() => Some(header_indent(t)),
            Item::ArrayOfTables(a) => a.iter().next().map(header_indent),
            _ => None,
        });
        if let Some(s) = sibling {
            return s;
        }
        if let Some(k) = kv_indent(parent) {
            return k;
        }
        if parent_is_root || parent.is_implicit() {
            return String::new();
        }
        format!("{}{}", header_indent(parent), self.step)
    }
}

/// Add `key = value` at the end of an inline table; the space before `}`
/// moves from the previous last value to the new one.
fn append_inline(t: &mut InlineTable, key: &Key, mut value: Value) {
    if let Some((_, last)) = t.iter_mut().last() {
        let ws = last
            .decor()
            .suffix()
            .and_then(|r| r.as_str())
            .filter(|s| !s.is_empty() && s.chars().all(|c| c == ' ' || c == '\t'))
            .map(String::from);
        if let Some(ws) = ws {
            last.decor_mut().set_suffix("");
            value.decor_mut().set_suffix(ws);
        }
    }
    t.insert_formatted(key, value);
}

fn replace_value(v: &mut Value, want: Want<'_>, doc_quote: Quote) {
    let quote = match v {
        Value::String(f) => match raw_first_char(f.as_repr().and_then(|r| r.as_raw().as_str())) {
            Some('\'') => Quote::Single,
            Some('"') => Quote::Double,
            _ => doc_quote,
        },
        _ => doc_quote,
    };
    let mut nv = want.to_value(quote);
    *nv.decor_mut() = v.decor().clone();
    *v = nv;
}

fn raw_first_char(raw: Option<&str>) -> Option<char> {
    raw.and_then(|s| s.chars().next())
}

fn dotted_name(path: &[&str]) -> String {
    path.iter()
        .map(|p| {
            if p.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                p.to_string()
            } else {
                format!("\"{p}\"")
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

fn describe(item: &Item) -> &'static str {
    match item {
        Item::None => "empty",
        Item::Table(_) => "a table",
        Item::ArrayOfTables(_) => "an array of tables",
        Item::Value(v) => match v {
            Value::String(_) => "a string",
            Value::Integer(_) => "an integer",
            Value::Float(_) => "a float",
            Value::Boolean(_) => "a boolean",
            Value::Datetime(_) => "a date-time",
            Value::Array(_) => "an array",
            Value::InlineTable(_) => "an inline table",
        },
    }
}

/// The largest document position of `t` and the tables under it.
fn max_position(t: &Table) -> Option<usize> {
    let below = t.iter().filter_map(|(_, item)| match item {
        Item::Table(sub) => max_position(sub),
        Item::ArrayOfTables(a) => a.iter().filter_map(max_position).max(),
        _ => None,
    });
    t.position().into_iter().chain(below).max()
}

/// Whitespace after the last newline of a decor prefix.
fn trailing_ws(prefix: Option<&str>) -> Option<String> {
    let p = prefix?;
    let tail = p.rsplit('\n').next().unwrap_or("");
    tail.chars()
        .all(|c| c == ' ' || c == '\t')
        .then(|| tail.to_string())
}

fn header_indent(t: &Table) -> String {
    trailing_ws(t.decor().prefix().and_then(|r| r.as_str())).unwrap_or_default()
}

/// Indentation of the table's own key/value lines, from its first one.
fn kv_indent(t: &Table) -> Option<String> {
    t.iter().find_map(|(k, item)| {
        let is_kv = match item {
            Item::Value(_) => true,
            Item::Table(sub) => sub.is_dotted(),
            _ => false,
        };
        if !is_kv {
            return None;
        }
        let key = t.key(k)?;
        trailing_ws(key.leaf_decor().prefix().and_then(|r| r.as_str()))
    })
}

/// The document's key indentation relative to headers, from the first table
/// that has both.
fn find_step(root: &Table) -> Option<String> {
    for (_, item) in root.iter() {
        let tables: Vec<&Table> = match item {
            Item::Table(t) => vec![t],
            Item::ArrayOfTables(a) => a.iter().collect(),
            _ => continue,
        };
        for t in tables {
            if !t.is_implicit() && !t.is_dotted() {
                if let Some(kv) = kv_indent(t) {
                    let h = header_indent(t);
                    if let Some(step) = kv.strip_prefix(h.as_str()) {
                        return Some(step.to_string());
                    }
                }
            }
            if let Some(s) = find_step(t) {
                return Some(s);
            }
        }
    }
    None
}

#[derive(Default)]
struct Tally {
    single: usize,
    double: usize,
}

impl Tally {
    fn add(&mut self, raw: Option<&str>) {
        match raw_first_char(raw) {
            Some('\'') => self.single += 1,
            Some('"') => self.double += 1,
            _ => {}
        }
    }

    fn pick(&self, default: Quote) -> Quote {
        match self.single.cmp(&self.double) {
            std::cmp::Ordering::Greater => Quote::Single,
            std::cmp::Ordering::Less => Quote::Double,
            std::cmp::Ordering::Equal => default,
        }
    }
}

/// How the document quotes string values and quoted keys.
#[derive(Default)]
struct QuoteCounts {
    values: Tally,
    keys: Tally,
}

impl QuoteCounts {
    fn table(&mut self, t: &dyn TableLike) {
        for (k, item) in t.iter() {
            if let Some(key) = t.key(k) {
                self.keys
                    .add(key.as_repr().and_then(|r| r.as_raw().as_str()));
            }
            match item {
                Item::Value(v) => self.value(v),
                Item::Table(sub) => self.table(sub),
                Item::ArrayOfTables(a) => a.iter().for_each(|sub| self.table(sub)),
                Item::None => {}
            }
        }
    }

    fn value(&mut self, v: &Value) {
        match v {
            Value::String(f) => self
                .values
                .add(f.as_repr().and_then(|r| r.as_raw().as_str())),
            Value::Array(a) => a.iter().for_each(|v| self.value(v)),
            Value::InlineTable(t) => self.table(t),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    const ADDR: &str = "/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock";
    const ROOT: &str = "/var/lib/soci-snapshotter-grpc";

    fn opts(transfer: Option<&str>) -> PatchOptions {
        PatchOptions {
            address: ADDR.to_string(),
            root: ROOT.to_string(),
            transfer_platform: transfer.map(String::from),
        }
    }

    /// Patch, check the result parses, reads back as SOCI, and that a second
    /// patch is byte-identical and unchanged.
    fn patch_ok(text: &str, transfer: Option<&str>) -> Patched {
        let o = opts(transfer);
        let p = patch("/etc/containerd/config.toml", text, &o).unwrap();
        let again = patch("/etc/containerd/config.toml", &p.text, &o).unwrap();
        assert_eq!(again.text, p.text, "second patch must be byte-identical");
        assert!(!again.changed, "second patch must report no change");
        assert_eq!(again.previous_snapshotter.as_deref(), Some(SOCI));
        let i = inspect("x", &p.text).unwrap();
        assert_eq!(i.cri_snapshotter.as_deref(), Some(SOCI));
        assert!(i.has_soci_proxy);
        // The patched file, read as containerd would after loading it.
        assert_eq!(dump_problems(&p.text, &o), Vec::<String>::new());
        p
    }

    #[test]
    fn v2_empty_config_gets_every_table() {
        let p = patch_ok("version = 2\n", None);
        assert!(p.changed);
        assert_eq!(p.schema, Schema::V2);
        assert_eq!(p.previous_snapshotter, None);
        assert_eq!(
            p.text,
            r#"version = 2

[plugins."io.containerd.grpc.v1.cri".containerd]
snapshotter = "soci"
disable_snapshot_annotations = false
discard_unpacked_layers = false

[proxy_plugins.soci]
type = "snapshot"
address = "/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock"

[proxy_plugins.soci.exports]
root = "/var/lib/soci-snapshotter-grpc"
"#
        );
    }

    #[test]
    fn v3_empty_config_uses_images_plugin_and_single_quotes() {
        let p = patch_ok("version = 3\n", None);
        assert_eq!(p.schema, Schema::V3);
        assert_eq!(
            p.text,
            r#"version = 3

[plugins.'io.containerd.cri.v1.images']
snapshotter = 'soci'
disable_snapshot_annotations = false
discard_unpacked_layers = false

[proxy_plugins.soci]
type = 'snapshot'
address = '/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock'

[proxy_plugins.soci.exports]
root = '/var/lib/soci-snapshotter-grpc'
"#
        );
    }

    #[test]
    fn v2_existing_cri_table_is_edited_in_place_and_sandbox_untouched() {
        let text = r#"version = 2
root = "/var/lib/containerd"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/kubernetes/pause:latest"

  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    snapshotter = "overlayfs"   # the default
    disable_snapshot_annotations = true

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

[grpc]
  address = "/run/containerd/containerd.sock"
"#;
        let p = patch_ok(text, None);
        assert_eq!(p.previous_snapshotter.as_deref(), Some("overlayfs"));
        assert_eq!(
            p.text,
            r#"version = 2
root = "/var/lib/containerd"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/kubernetes/pause:latest"

  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    snapshotter = "soci"   # the default
    disable_snapshot_annotations = false
    discard_unpacked_layers = false

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

[grpc]
  address = "/run/containerd/containerd.sock"

[proxy_plugins.soci]
  type = "snapshot"
  address = "/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock"

  [proxy_plugins.soci.exports]
    root = "/var/lib/soci-snapshotter-grpc"
"#
        );
        let i = inspect("x", &p.text).unwrap();
        assert_eq!(
            i.sandbox_image.as_deref(),
            Some("localhost/kubernetes/pause:latest")
        );
    }

    #[test]
    fn v3_sandbox_is_reported_and_never_written() {
        let text = "version = 3\n\n[plugins.'io.containerd.cri.v1.images'.pinned_images]\n  sandbox = \"registry.k8s.io/pause:3.10\" # pinned\n";
        let before = inspect("x", text).unwrap();
        assert_eq!(
            before.sandbox_image.as_deref(),
            Some("registry.k8s.io/pause:3.10")
        );
        let p = patch_ok(text, None);
        assert!(
            p.text
                .contains("\n  sandbox = \"registry.k8s.io/pause:3.10\" # pinned\n"),
            "{}",
            p.text
        );
        // The images table existed only implicitly (through pinned_images):
        // its keys get a header placed before the sub-table.
        let images = p
            .text
            .find("[plugins.'io.containerd.cri.v1.images']\n")
            .unwrap();
        let pinned = p
            .text
            .find("[plugins.'io.containerd.cri.v1.images'.pinned_images]")
            .unwrap();
        assert!(images < pinned, "{}", p.text);
        assert_eq!(
            inspect("x", &p.text).unwrap().sandbox_image,
            before.sandbox_image
        );
    }

    #[test]
    fn comments_order_and_formatting_survive() {
        let text = r#"# Managed by hand. Do not blindly append.
version = 2 # schema

# CRI settings
[plugins."io.containerd.grpc.v1.cri".containerd]
# which snapshotter
snapshotter = "overlayfs" # was overlayfs
default_runtime_name = "runc"

# Metrics
[metrics]
address = "127.0.0.1:1338" # scrape me
# trailing comment
"#;
        let p = patch_ok(text, None);
        for line in [
            "# Managed by hand. Do not blindly append.\n",
            "version = 2 # schema\n",
            "# CRI settings\n",
            "# which snapshotter\nsnapshotter = \"soci\" # was overlayfs\ndefault_runtime_name = \"runc\"\n",
            "# Metrics\n[metrics]\naddress = \"127.0.0.1:1338\" # scrape me\n",
            "# trailing comment\n",
        ] {
            assert!(p.text.contains(line), "lost {line:?} in:\n{}", p.text);
        }
        let cri = p.text.find("[plugins.").unwrap();
        let metrics = p.text.find("[metrics]").unwrap();
        let proxy = p.text.find("[proxy_plugins.soci]").unwrap();
        assert!(cri < metrics && metrics < proxy, "{}", p.text);
    }

    #[test]
    fn existing_stargz_proxy_plugin_is_kept_and_soci_added_beside_it() {
        let text = r#"version = 2

[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "stargz"
  disable_snapshot_annotations = false

[proxy_plugins]
  [proxy_plugins.stargz]
    type = "snapshot"
    address = "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock"
  [proxy_plugins.stargz.exports]
    root = "/var/lib/containerd-stargz-grpc/"

[timeouts]
  "io.containerd.timeout.shim.cleanup" = "5s"
"#;
        let p = patch_ok(text, None);
        assert_eq!(p.previous_snapshotter.as_deref(), Some("stargz"));
        assert_eq!(
            p.text,
            r#"version = 2

[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "soci"
  disable_snapshot_annotations = false
  discard_unpacked_layers = false

[proxy_plugins]
  [proxy_plugins.stargz]
    type = "snapshot"
    address = "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock"
  [proxy_plugins.stargz.exports]
    root = "/var/lib/containerd-stargz-grpc/"

  [proxy_plugins.soci]
    type = "snapshot"
    address = "/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock"

    [proxy_plugins.soci.exports]
      root = "/var/lib/soci-snapshotter-grpc"

[timeouts]
  "io.containerd.timeout.shim.cleanup" = "5s"
"#
        );
        // Exactly one [proxy_plugins] table: no "duplicated tables".
        assert_eq!(p.text.matches("[proxy_plugins]").count(), 1);
    }

    #[test]
    fn existing_soci_proxy_plugin_only_has_its_keys_updated() {
        let text = r#"version = 2
[proxy_plugins.soci]
type = "snapshot"
address = "/old/soci.sock" # moved
platform = "linux/amd64"
[proxy_plugins.soci.exports]
root = "/var/lib/soci-snapshotter-grpc"
custom = "kept"
"#;
        let p = patch_ok(text, None);
        assert!(
            p.text.contains(
                "[proxy_plugins.soci]\ntype = \"snapshot\"\naddress = \"/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock\" # moved\nplatform = \"linux/amd64\"\n[proxy_plugins.soci.exports]\nroot = \"/var/lib/soci-snapshotter-grpc\"\ncustom = \"kept\"\n"
            ),
            "{}",
            p.text
        );
        assert_eq!(p.text.matches("[proxy_plugins.soci]").count(), 1);
    }

    #[test]
    fn dotted_keys_are_edited_where_they_are() {
        let text = r#"version = 2
plugins."io.containerd.grpc.v1.cri".containerd.snapshotter = "overlayfs"
proxy_plugins.stargz.type = "snapshot"
proxy_plugins.stargz.address = "/run/stargz.sock"

[grpc]
address = "/run/containerd/containerd.sock"
"#;
        let p = patch_ok(text, None);
        assert_eq!(
            p.text,
            r#"version = 2
plugins."io.containerd.grpc.v1.cri".containerd.snapshotter = "soci"
plugins."io.containerd.grpc.v1.cri".containerd.disable_snapshot_annotations = false
plugins."io.containerd.grpc.v1.cri".containerd.discard_unpacked_layers = false
proxy_plugins.stargz.type = "snapshot"
proxy_plugins.stargz.address = "/run/stargz.sock"

[grpc]
address = "/run/containerd/containerd.sock"

[proxy_plugins.soci]
type = "snapshot"
address = "/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock"

[proxy_plugins.soci.exports]
root = "/var/lib/soci-snapshotter-grpc"
"#
        );
    }

    #[test]
    fn dotted_keys_inside_a_header_table() {
        let text = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\nsandbox_image = \"pause:1\"\ncontainerd.snapshotter = \"overlayfs\"\n";
        let p = patch_ok(text, None);
        assert!(
            p.text.starts_with("version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\nsandbox_image = \"pause:1\"\ncontainerd.snapshotter = \"soci\"\ncontainerd.disable_snapshot_annotations = false\ncontainerd.discard_unpacked_layers = false\n"),
            "{}",
            p.text
        );
    }

    #[test]
    fn inline_tables_are_edited_in_place() {
        let text = "version = 2\n[proxy_plugins]\nsoci = { type = \"snapshot\", address = \"/old\" }\n[plugins.\"io.containerd.grpc.v1.cri\"]\ncontainerd = { snapshotter = \"overlayfs\" }\n";
        let p = patch_ok(text, None);
        assert_eq!(
            p.text,
            "version = 2\n[proxy_plugins]\nsoci = { type = \"snapshot\", address = \"/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock\", exports = { root = \"/var/lib/soci-snapshotter-grpc\" } }\n[plugins.\"io.containerd.grpc.v1.cri\"]\ncontainerd = { snapshotter = \"soci\", disable_snapshot_annotations = false, discard_unpacked_layers = false }\n"
        );
    }

    #[test]
    fn single_quoted_v2_document_gets_single_quoted_values() {
        // nodeadm's merged output (go-toml) quotes everything with ''.
        let text = "root = '/var/lib/containerd'\nversion = 2\n\n[plugins]\n[plugins.'io.containerd.grpc.v1.cri']\nsandbox_image = 'localhost/kubernetes/pause:latest'\n";
        let p = patch_ok(text, None);
        assert!(
            p.text.contains(
                "[plugins.'io.containerd.grpc.v1.cri'.containerd]\nsnapshotter = 'soci'\n"
            ),
            "{}",
            p.text
        );
        assert!(p
            .text
            .contains("address = '/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock'\n"));
    }

    #[test]
    fn transfer_service_entry_is_added_or_updated_for_the_platform_only() {
        let text = r#"version = 3

[plugins.'io.containerd.transfer.v1.local']
  max_concurrent_downloads = 3

  [[plugins.'io.containerd.transfer.v1.local'.unpack_config]]
    platform = 'linux/amd64'
    snapshotter = 'overlayfs'

  [[plugins.'io.containerd.transfer.v1.local'.unpack_config]]
    platform = 'linux/arm64'
    snapshotter = 'overlayfs'

[cgroup]
  path = ''
"#;
        let p = patch_ok(text, Some("linux/amd64"));
        assert!(
            p.text.contains("  [[plugins.'io.containerd.transfer.v1.local'.unpack_config]]\n    platform = 'linux/amd64'\n    snapshotter = 'soci'\n\n  [[plugins.'io.containerd.transfer.v1.local'.unpack_config]]\n    platform = 'linux/arm64'\n    snapshotter = 'overlayfs'\n\n[plugins.'io.containerd.cri.v1.images']\n  snapshotter = 'soci'\n"),
            "{}",
            p.text
        );
        assert!(p
            .text
            .ends_with("  [proxy_plugins.soci.exports]\n    root = '/var/lib/soci-snapshotter-grpc'\n    enable_remote_snapshot_annotations = 'true'\n"), "{}", p.text);

        // A platform without an entry gets one appended after the others.
        let p = patch_ok(text, Some("linux/riscv64"));
        assert!(
            p.text.contains("    platform = 'linux/arm64'\n    snapshotter = 'overlayfs'\n\n  [[plugins.'io.containerd.transfer.v1.local'.unpack_config]]\n    platform = 'linux/riscv64'\n    snapshotter = 'soci'\n\n[plugins.'io.containerd.cri.v1.images']"),
            "{}",
            p.text
        );
        assert_eq!(p.text.matches("snapshotter = 'overlayfs'").count(), 2);
    }

    #[test]
    fn transfer_service_entry_in_an_empty_v3_config() {
        let p = patch_ok("version = 3\n", Some("linux/arm64"));
        assert!(
            p.text.contains("\n[[plugins.'io.containerd.transfer.v1.local'.unpack_config]]\nplatform = 'linux/arm64'\nsnapshotter = 'soci'\n"),
            "{}",
            p.text
        );
    }

    #[test]
    fn transfer_service_inline_array_form() {
        let text = "version = 3\n[plugins.'io.containerd.transfer.v1.local']\nunpack_config = [{ platform = 'linux/amd64', snapshotter = 'overlayfs' }]\n";
        let p = patch_ok(text, Some("linux/amd64"));
        assert!(
            p.text
                .contains("unpack_config = [{ platform = 'linux/amd64', snapshotter = 'soci' }]\n"),
            "{}",
            p.text
        );
    }

    #[test]
    fn without_transfer_platform_no_transfer_keys_are_written() {
        let p = patch_ok("version = 3\n", None);
        assert!(!p.text.contains("unpack_config"));
        assert!(!p.text.contains("enable_remote_snapshot_annotations"));
    }

    #[test]
    fn imports_are_inspected_and_the_last_definer_is_the_target() {
        let main = "version = 2\nimports = [\"/etc/containerd/conf.d/*.toml\"]\n[plugins.\"io.containerd.grpc.v1.cri\"]\nsandbox_image = \"pause:1\"\n";
        let i = inspect("/etc/containerd/config.toml", main).unwrap();
        assert_eq!(i.imports, vec!["/etc/containerd/conf.d/*.toml".to_string()]);
        let imports = vec![
            (
                "/etc/containerd/conf.d/10-cri.toml".to_string(),
                "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\nsnapshotter = \"overlayfs\"\n".to_string(),
            ),
            (
                "/etc/containerd/conf.d/20-metrics.toml".to_string(),
                "version = 2\n[metrics]\naddress = \"127.0.0.1:1338\"\n".to_string(),
            ),
        ];
        assert_eq!(
            patch_target("/etc/containerd/config.toml", main, &imports).unwrap(),
            "/etc/containerd/conf.d/10-cri.toml"
        );
        // No import defines the CRI: the main file.
        assert_eq!(
            patch_target("/etc/containerd/config.toml", main, &imports[1..]).unwrap(),
            "/etc/containerd/config.toml"
        );
        // v3: the images plugin table counts, an import without `version`
        // is read with the main file's schema.
        let main3 = "version = 3\nimports = ['conf.d/*.toml']\n";
        let imp = vec![(
            "/etc/containerd/conf.d/50.toml".to_string(),
            "[plugins.'io.containerd.cri.v1.images'.registry]\nconfig_path = '/etc/containerd/certs.d'\n".to_string(),
        )];
        assert_eq!(
            patch_target("/etc/containerd/config.toml", main3, &imp).unwrap(),
            "/etc/containerd/conf.d/50.toml"
        );
        // A v2 table in a v3 world does not count.
        let imp = vec![(
            "/etc/containerd/conf.d/50.toml".to_string(),
            "version = 3\n[plugins.\"io.containerd.grpc.v1.cri\"]\nstream_server_port = '0'\n"
                .to_string(),
        )];
        assert_eq!(
            patch_target("/etc/containerd/config.toml", main3, &imp).unwrap(),
            "/etc/containerd/config.toml"
        );
        // An unparsable import is named.
        let bad = vec![(
            "/etc/containerd/conf.d/bad.toml".to_string(),
            "[x\n".to_string(),
        )];
        let e = patch_target("/etc/containerd/config.toml", main3, &bad).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/etc/containerd/conf.d/bad.toml:1:"),
            "{e}"
        );
    }

    #[test]
    fn import_without_version_is_patched_with_the_main_schema() {
        let text = "[plugins.'io.containerd.cri.v1.images']\nsnapshotter = 'overlayfs'\n";
        assert!(matches!(
            patch("i.toml", text, &opts(None)),
            Err(ContainerdError::Unsupported { .. })
        ));
        let p = patch_with_schema("i.toml", text, &opts(None), Schema::V3).unwrap();
        assert!(p
            .text
            .starts_with("[plugins.'io.containerd.cri.v1.images']\nsnapshotter = 'soci'\n"));
        assert!(!p.text.contains("version"));
        let u = unpatch_with_schema("i.toml", &p.text, "overlayfs", Schema::V3).unwrap();
        assert!(u.text.contains("snapshotter = 'overlayfs'"));
    }

    #[test]
    fn imports_must_be_strings() {
        let e = inspect("c.toml", "version = 2\nimports = 5\n").unwrap_err();
        assert!(matches!(e, ContainerdError::Conflict { .. }), "{e}");
        assert!(e.to_string().contains("`imports`"), "{e}");
    }

    #[test]
    fn disabled_cri_is_reported_and_still_patched() {
        let text = "version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n";
        assert!(inspect("x", text).unwrap().cri_disabled);
        let p = patch_ok(text, None);
        assert!(inspect("x", &p.text).unwrap().cri_disabled);
        // containerd matches full ids; other plugins do not count.
        let text =
            "version = 2\ndisabled_plugins = [\"cri\", \"io.containerd.snapshotter.v1.btrfs\"]\n";
        assert!(!inspect("x", text).unwrap().cri_disabled);
        let text = "version = 3\ndisabled_plugins = ['io.containerd.cri.v1.images']\n";
        assert!(inspect("x", text).unwrap().cri_disabled);
        assert!(!inspect("x", "version = 3\n").unwrap().cri_disabled);
    }

    #[test]
    fn unparsable_input_reports_line_and_column() {
        // The classic: a blind append of a second [proxy_plugins] table.
        let text = "version = 2\n\n[proxy_plugins]\n  [proxy_plugins.stargz]\n    type = \"snapshot\"\n\n[proxy_plugins]\n";
        let e = patch("/etc/containerd/config.toml", text, &opts(None)).unwrap_err();
        match &e {
            ContainerdError::Parse {
                path,
                line,
                column,
                message,
            } => {
                assert_eq!(path, "/etc/containerd/config.toml");
                assert_eq!((*line, *column), (7, 1), "{message}");
                assert!(message.contains("proxy_plugins"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        let shown = e.to_string();
        assert!(
            shown.starts_with("/etc/containerd/config.toml:7:1: not valid TOML: "),
            "{shown}"
        );
        assert!(
            shown.contains("containerd --config /etc/containerd/config.toml config dump"),
            "{shown}"
        );
        assert!(shown.ends_with("soci-node leaves it untouched"), "{shown}");

        // Column counts characters, not bytes.
        let e = inspect("c.toml", "version = 2\n# héllo\nnamé = = 1\n").unwrap_err();
        let ContainerdError::Parse { line, column, .. } = e else {
            panic!("{e:?}")
        };
        assert_eq!((line, column), (3, 4));
        let e = inspect("c.toml", "version = 2\nx = \"é\" y\n").unwrap_err();
        let ContainerdError::Parse { line, column, .. } = e else {
            panic!("{e:?}")
        };
        assert_eq!((line, column), (2, 9));
        assert!(unpatch("c.toml", "[", "overlayfs").is_err());
    }

    #[test]
    fn non_table_keys_on_the_way_are_conflicts() {
        let e = patch("c.toml", "version = 2\nproxy_plugins = 5\n", &opts(None)).unwrap_err();
        assert!(matches!(e, ContainerdError::Conflict { .. }), "{e:?}");
        let s = e.to_string();
        assert!(
            s.starts_with("c.toml: `proxy_plugins` is an integer, but containerd expects a table"),
            "{s}"
        );
        assert!(s.contains("fix or remove `proxy_plugins`"), "{s}");

        let e = patch(
            "c.toml",
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\ncontainerd = \"x\"\n",
            &opts(None),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("`plugins.\"io.containerd.grpc.v1.cri\".containerd` is a string"),
            "{e}"
        );

        let e = patch(
            "c.toml",
            "version = 2\n[[proxy_plugins]]\nx = 1\n",
            &opts(None),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("`proxy_plugins` is an array of tables"),
            "{e}"
        );

        let e = patch(
            "c.toml",
            "version = 3\n[plugins.'io.containerd.cri.v1.images'.snapshotter]\nx = 1\n",
            &opts(None),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("`snapshotter` is a table, but containerd expects a value"),
            "{e}"
        );

        let e = patch(
            "c.toml",
            "version = 3\n[plugins.'io.containerd.transfer.v1.local']\nunpack_config = 'linux'\n",
            &opts(Some("linux/amd64")),
        )
        .unwrap_err();
        assert!(e.to_string().contains("unpack_config` is a string"), "{e}");
    }

    #[test]
    fn unsupported_versions() {
        for (text, want) in [
            (
                "[grpc]\n",
                "containerd config version 1 is not supported (the file has no `version` key",
            ),
            (
                "version = 1\n",
                "containerd config version 1 is not supported;",
            ),
            (
                "version = 4\n",
                "containerd config version 4 is not supported",
            ),
            ("version = \"2\"\n", "`version` must be an integer"),
        ] {
            let e = patch("c.toml", text, &opts(None)).unwrap_err();
            assert!(matches!(e, ContainerdError::Unsupported { .. }), "{e:?}");
            let s = e.to_string();
            assert!(s.starts_with("c.toml: "), "{s}");
            assert!(s.contains(want), "{s}");
            assert!(s.contains("containerd config default"), "{s}");
            assert!(inspect("c.toml", text).is_err());
        }
    }

    #[test]
    fn unpatch_restores_the_snapshotter_only() {
        let text = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\nsnapshotter = \"overlayfs\" # default\n";
        let p = patch_ok(text, None);
        let u = unpatch("c.toml", &p.text, "overlayfs").unwrap();
        assert!(u.changed);
        assert_eq!(u.previous_snapshotter.as_deref(), Some(SOCI));
        assert_eq!(
            u.text,
            p.text.replace(
                "snapshotter = \"soci\" # default",
                "snapshotter = \"overlayfs\" # default"
            )
        );
        // Everything else stays: the proxy plugin is harmless.
        assert!(inspect("c.toml", &u.text).unwrap().has_soci_proxy);
        // Again: nothing to do, byte-identical.
        let again = unpatch("c.toml", &u.text, "overlayfs").unwrap();
        assert!(!again.changed);
        assert_eq!(again.text, u.text);
        assert_eq!(again.previous_snapshotter.as_deref(), Some("overlayfs"));
        // Another snapshotter is not ours to change.
        let stargz = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\nsnapshotter = \"stargz\"\n";
        let u = unpatch("c.toml", stargz, "overlayfs").unwrap();
        assert!(!u.changed);
        assert_eq!(u.text, stargz);
        // No snapshotter at all: unchanged too.
        let u = unpatch("c.toml", "version = 3\n", "overlayfs").unwrap();
        assert!(!u.changed);
    }

    #[test]
    fn unpatch_to_the_original_is_byte_identical() {
        let originals = [
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\nsnapshotter = \"overlayfs\" # default\n",
            "version = 2\n# nodeadm\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\nsnapshotter = \"overlayfs\"\ndisable_snapshot_annotations = true\n\n[proxy_plugins.stargz]\ntype = \"snapshot\"\naddress = \"/run/stargz.sock\"\n",
        ];
        for original in originals {
            let p = patch_ok(original, None);
            assert!(p.text.contains("disable_snapshot_annotations = false"));
            let r = Restore::from_original("c.toml", Some(original));
            assert!(r.drop_soci_proxy);
            let u = unpatch_to("c.toml", &p.text, &r, Schema::V2).unwrap();
            let i = inspect("c.toml", &u.text).unwrap();
            assert_eq!(i.cri_snapshotter.as_deref(), Some("overlayfs"));
            assert!(!i.has_soci_proxy, "{}", u.text);
            assert!(
                !u.text.contains("disable_snapshot_annotations = false"),
                "{}",
                u.text
            );
            assert!(u.text.contains("[proxy_plugins.stargz]") == original.contains("stargz"));
        }
        // Without an original nothing but the snapshotter moves.
        let p = patch_ok(originals[0], None);
        let u = unpatch_to(
            "c.toml",
            &p.text,
            &Restore::from_original("c.toml", None),
            Schema::V2,
        )
        .unwrap();
        assert!(inspect("c.toml", &u.text).unwrap().has_soci_proxy);
    }

    #[test]
    fn unpatch_also_restores_transfer_unpack_entries() {
        let p = patch_ok("version = 3\n", Some("linux/amd64"));
        let u = unpatch("c.toml", &p.text, "overlayfs").unwrap();
        assert!(!u.text.contains("'soci'\n\n[proxy"), "{}", u.text);
        assert!(
            u.text
                .contains("platform = 'linux/amd64'\nsnapshotter = 'overlayfs'\n"),
            "{}",
            u.text
        );
        assert!(
            u.text
                .contains("[plugins.'io.containerd.cri.v1.images']\nsnapshotter = 'overlayfs'\n"),
            "{}",
            u.text
        );
        assert_eq!(
            inspect("c", &u.text).unwrap().cri_snapshotter.as_deref(),
            Some("overlayfs")
        );
    }

    #[test]
    fn indentation_of_the_document_is_followed() {
        let text = "version = 3\n\n[plugins]\n  [plugins.'io.containerd.cri.v1.images']\n    snapshotter = 'overlayfs'\n\n  [plugins.'io.containerd.transfer.v1.local']\n    config_path = ''\n";
        let p = patch_ok(text, Some("linux/amd64"));
        assert_eq!(
            p.text,
            "version = 3\n\n[plugins]\n  [plugins.'io.containerd.cri.v1.images']\n    snapshotter = 'soci'\n    disable_snapshot_annotations = false\n    discard_unpacked_layers = false\n\n  [plugins.'io.containerd.transfer.v1.local']\n    config_path = ''\n\n    [[plugins.'io.containerd.transfer.v1.local'.unpack_config]]\n      platform = 'linux/amd64'\n      snapshotter = 'soci'\n\n[proxy_plugins.soci]\n  type = 'snapshot'\n  address = '/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock'\n\n  [proxy_plugins.soci.exports]\n    root = '/var/lib/soci-snapshotter-grpc'\n    enable_remote_snapshot_annotations = 'true'\n"
        );
    }

    #[test]
    fn header_spelling_survives_a_rerender() {
        // nodeadm's v3 template spells the images plugin id both ways.
        let text = "version = 3\n[plugins.'io.containerd.cri.v1.images']\ndiscard_unpacked_layers = true\n\n[plugins.\"io.containerd.cri.v1.images\".registry]  # mirrors\nconfig_path = '/etc/containerd/certs.d'\n\n[[plugins.\"io.containerd.transfer.v1.local\".unpack_config]]\nplatform = 'linux/arm64'\nsnapshotter = 'overlayfs'\n";
        let p = patch_ok(text, Some("linux/amd64"));
        assert!(
            p.text
                .contains("\n[plugins.\"io.containerd.cri.v1.images\".registry]  # mirrors\n"),
            "{}",
            p.text
        );
        assert!(
            p.text.contains("\n[[plugins.\"io.containerd.transfer.v1.local\".unpack_config]]\nplatform = 'linux/arm64'\n"),
            "{}",
            p.text
        );
        assert_eq!(
            header_path("  [a.'b.c'.\"d]\"] # x"),
            Some((false, vec!["a".into(), "b.c".into(), "d]".into()]))
        );
        assert_eq!(
            header_path("[[a.b]]"),
            Some((true, vec!["a".into(), "b".into()]))
        );
        assert_eq!(header_path("  [\"a\", \"b\"],"), None);
        assert_eq!(header_path("[1, 2]"), None);
    }

    #[test]
    fn already_patched_text_is_returned_verbatim() {
        // Odd but valid formatting that a re-render would normalise must
        // survive a no-op patch byte for byte.
        let text = "version=2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\nsnapshotter=\"soci\"\ndisable_snapshot_annotations=false\ndiscard_unpacked_layers=false\n[proxy_plugins.soci]\ntype=\"snapshot\"\naddress=\"/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock\"\n[proxy_plugins.soci.exports]\nroot=\"/var/lib/soci-snapshotter-grpc\"\n";
        let p = patch("c.toml", text, &opts(None)).unwrap();
        assert!(!p.changed);
        assert_eq!(p.text, text);
    }

    #[test]
    fn dump_problems_name_what_is_missing() {
        let o = opts(Some("linux/amd64"));
        let problems = dump_problems("version = 2\n", &o);
        let joined = problems.join("\n");
        assert!(joined.contains("CRI snapshotter (plugins.io.containerd.grpc.v1.cri.containerd.snapshotter) is missing, not \"soci\""), "{joined}");
        assert!(
            joined.contains("disable_snapshot_annotations is missing, not false"),
            "{joined}"
        );
        assert!(
            joined.contains("proxy_plugins.soci.type is missing"),
            "{joined}"
        );
        assert!(
            joined.contains("enable_remote_snapshot_annotations is missing"),
            "{joined}"
        );
        assert!(
            joined.contains("unpack_config has no entry with platform \"linux/amd64\""),
            "{joined}"
        );
        let p = patch("c", "version = 3\n", &o).unwrap();
        assert_eq!(dump_problems(&p.text, &o), Vec::<String>::new());
        let wrong = PatchOptions {
            address: "/elsewhere.sock".into(),
            ..opts(None)
        };
        assert_eq!(dump_problems(&p.text, &wrong).len(), 1);
        assert!(!dump_problems("not toml [", &o).is_empty());
    }

    #[test]
    fn inspection_serializes_for_status_json() {
        let i = inspect("x", "version = 3\n").unwrap();
        let j = serde_json::to_value(&i).unwrap();
        assert_eq!(j["schema"], "v3");
        assert_eq!(j["cri_snapshotter"], serde_json::Value::Null);
    }
}
