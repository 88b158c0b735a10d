//! `kiln index`: a vector database with PostgreSQL + pgvector. `build` embeds a corpus in
//! process (the server's tokenization and engine, optionally its PCA projection) into a table
//! `(id bigint, text text, embedding vector(d))` with an HNSW (or IVFFlat) cosine index;
//! `query` embeds a text the same way and returns the nearest stored texts (`<=>`, cosine
//! distance). See docs/vector-search.md.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use kiln_models::DeviceSpec;
use pgvector::Vector;
use postgres::{Client, NoTls};
use serde::Serialize;

use crate::corpus::{read_corpus, CorpusEmbedder};
use crate::pca::Projection;

const INSTALL_HINT: &str = "the pgvector extension is not installed in this PostgreSQL server: install it \
     (Debian/Ubuntu with the PGDG repository: `apt-get install postgresql-15-pgvector`; otherwise build it from \
     source, see docs/vector-search.md)";

#[derive(Debug, Clone, clap::Subcommand)]
pub enum IndexCommand {
    /// Embed a corpus and store it (id, text, embedding) in a PostgreSQL table with a pgvector
    /// cosine index.
    Build(BuildArgs),
    /// The stored texts nearest (cosine) to a query text.
    Query(QueryArgs),
}

/// Where the vectors live.
#[derive(Debug, Clone, clap::Args)]
pub struct Database {
    /// PostgreSQL connection: a URL (`postgresql://user@localhost:5432/db`) or key=value pairs
    /// (`host=/var/run/postgresql user=postgres dbname=postgres`; a host starting with / is a
    /// unix-socket folder).
    #[arg(long, env = "DATABASE_URL")]
    pub database: String,
    /// Table name: lowercase letters, digits and `_`.
    #[arg(long, default_value = "kiln_documents")]
    pub table: String,
}

/// How the model embeds texts.
#[derive(Debug, Clone, clap::Args)]
pub struct Embedder {
    /// sentence-transformers model folder (the same one the server serves).
    #[arg(long)]
    pub model: PathBuf,
    /// A projection written by `kiln pca fit` (the same one the model's config references).
    #[arg(long)]
    pub projection: Option<PathBuf>,
    /// A named prompt of the model to prepend (e5: `passage` to build, `query` to query);
    /// default: the model's default prompt.
    #[arg(long)]
    pub prompt_name: Option<String>,
    /// Token budget of one forward (padded tokens).
    #[arg(long, default_value_t = 8192)]
    pub max_batch_tokens: usize,
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IndexKind {
    /// Hierarchical navigable small world graph (pgvector ≥ 0.5).
    Hnsw,
    /// Inverted lists; built from the rows present (build after loading, as here).
    Ivfflat,
    /// No index: exact scans.
    None,
}

#[derive(Debug, Clone, clap::Args)]
pub struct BuildArgs {
    #[command(flatten)]
    pub embedder: Embedder,
    #[command(flatten)]
    pub db: Database,
    /// Texts to index: one per line, or JSON lines with a "text" field. Blank lines are
    /// skipped; ids count the texts from 0.
    #[arg(long)]
    pub corpus: PathBuf,
    /// Drop the table first if it exists (otherwise an existing table is an error).
    #[arg(long)]
    pub recreate: bool,
    #[arg(long, value_enum, default_value = "hnsw")]
    pub index: IndexKind,
}

#[derive(Debug, Clone, clap::Args)]
pub struct QueryArgs {
    #[command(flatten)]
    pub embedder: Embedder,
    #[command(flatten)]
    pub db: Database,
    /// The query text.
    #[arg(long)]
    pub text: String,
    /// How many neighbours to return.
    #[arg(short = 'k', long = "top-k", default_value_t = 5)]
    pub k: usize,
    /// HNSW search breadth (`hnsw.ef_search`; higher is more exact, slower).
    #[arg(long, default_value_t = 100)]
    pub ef_search: u32,
    /// IVFFlat lists probed (`ivfflat.probes`).
    #[arg(long, default_value_t = 10)]
    pub probes: u32,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

/// One nearest neighbour.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hit {
    pub id: i64,
    pub text: String,
    /// Cosine distance (1 − cosine similarity).
    pub distance: f64,
}

pub fn run(cmd: IndexCommand) -> anyhow::Result<()> {
    match cmd {
        IndexCommand::Build(args) => build(&args).map(|_| ()),
        IndexCommand::Query(args) => {
            let hits = query(&args)?;
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({"query": args.text, "results": hits}))?
                );
            } else {
                for (rank, h) in hits.iter().enumerate() {
                    println!("{:>3}  {:.4}  [{}] {}", rank + 1, 1.0 - h.distance, h.id, h.text);
                }
            }
            Ok(())
        }
    }
}

/// A safe SQL identifier (used unquoted).
fn check_table(name: &str) -> anyhow::Result<&str> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63;
    if !ok {
        bail!("--table {name:?}: use lowercase letters, digits and _ (starting with a letter or _), at most 63");
    }
    Ok(name)
}

fn connect(db: &Database) -> anyhow::Result<Client> {
    Client::connect(&db.database, NoTls).with_context(|| format!("connecting to PostgreSQL ({})", db.database))
}

/// Loads the model (and projection) and embeds `texts`.
fn embed(e: &Embedder, texts: &[String]) -> anyhow::Result<(String, Vec<Vec<f32>>)> {
    let projection = e.projection.as_deref().map(Projection::load).transpose()?;
    let embedder = CorpusEmbedder::load(&e.model, e.device, e.max_batch_tokens)?;
    if let Some(p) = &projection {
        if p.input_dims() != embedder.dimensions() {
            bail!(
                "the projection {} reads {}-dimensional vectors but the model {} has {}",
                e.projection.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                p.input_dims(),
                e.model.display(),
                embedder.dimensions()
            );
        }
    }
    let vectors = embedder.embed(texts, e.prompt_name.as_deref())?;
    let vectors = match &projection {
        Some(p) => vectors.iter().map(|v| p.apply(v, embedder.normalize())).collect(),
        None => vectors,
    };
    Ok((embedder.model_name().to_string(), vectors))
}

fn ensure_extension(client: &mut Client) -> anyhow::Result<()> {
    match client.batch_execute("CREATE EXTENSION IF NOT EXISTS vector") {
        Ok(()) => Ok(()),
        Err(e) if e.code() == Some(&postgres::error::SqlState::UNDEFINED_FILE) => {
            Err(anyhow::Error::new(e).context(INSTALL_HINT))
        }
        Err(e) => {
            Err(anyhow::Error::new(e).context("CREATE EXTENSION vector (it needs a superuser or the database owner)"))
        }
    }
}

fn table_exists(client: &mut Client, table: &str) -> anyhow::Result<bool> {
    let row = client.query_one("SELECT to_regclass($1)::text", &[&table])?;
    Ok(row.get::<_, Option<String>>(0).is_some())
}

/// Runs `kiln index build`; returns the number of rows stored.
pub fn build(args: &BuildArgs) -> anyhow::Result<usize> {
    let table = check_table(&args.db.table)?;
    let texts = read_corpus(&args.corpus)?;
    // Connect before the (long) embedding so that a wrong URL fails at once.
    let mut client = connect(&args.db)?;
    ensure_extension(&mut client)?;
    if args.recreate {
        client.batch_execute(&format!("DROP TABLE IF EXISTS {table}"))?;
    } else if table_exists(&mut client, table)? {
        bail!("the table {table} already exists: pass --recreate to replace it, or choose another --table");
    }
    let (model, vectors) = embed(&args.embedder, &texts)?;
    let dims = vectors[0].len();
    let t0 = Instant::now();
    let mut tx = client.transaction()?;
    tx.batch_execute(&format!(
        "CREATE TABLE {table} (id bigint PRIMARY KEY, text text NOT NULL, embedding vector({dims}) NOT NULL)"
    ))
    .with_context(|| format!("creating the table {table}"))?;
    let insert = tx.prepare(&format!("INSERT INTO {table} (id, text, embedding) VALUES ($1, $2, $3)"))?;
    for (i, (text, v)) in texts.iter().zip(&vectors).enumerate() {
        tx.execute(&insert, &[&(i as i64), text, &Vector::from(v.clone())])?;
    }
    let using = match args.index {
        IndexKind::Hnsw => Some("hnsw (embedding vector_cosine_ops)".to_string()),
        // pgvector's advice: rows / 1000 lists up to a million rows.
        IndexKind::Ivfflat => {
            Some(format!("ivfflat (embedding vector_cosine_ops) WITH (lists = {})", (texts.len() / 1000).max(1)))
        }
        IndexKind::None => None,
    };
    if let Some(using) = &using {
        tx.batch_execute(&format!("CREATE INDEX {table}_embedding_idx ON {table} USING {using}"))
            .context("creating the vector index")?;
    }
    let comment = serde_json::json!({
        "model": model,
        "dimensions": dims,
        "projection": args.embedder.projection,
        "prompt_name": args.embedder.prompt_name,
    });
    tx.batch_execute(&format!("COMMENT ON TABLE {table} IS '{}'", comment.to_string().replace('\'', "''")))?;
    tx.commit()?;
    println!(
        "indexed {} texts into {table} ({dims} dimensions, {} cosine index) in {:.2} s",
        texts.len(),
        match args.index {
            IndexKind::Hnsw => "HNSW",
            IndexKind::Ivfflat => "IVFFlat",
            IndexKind::None => "no",
        },
        t0.elapsed().as_secs_f64()
    );
    Ok(texts.len())
}

/// Runs `kiln index query`: the `k` nearest stored texts, nearest first.
pub fn query(args: &QueryArgs) -> anyhow::Result<Vec<Hit>> {
    let table = check_table(&args.db.table)?;
    if args.k == 0 {
        bail!("--top-k must be at least 1");
    }
    if args.text.is_empty() {
        bail!("--text must not be empty");
    }
    let mut client = connect(&args.db)?;
    if !table_exists(&mut client, table)? {
        bail!("the table {table} does not exist: create it with `kiln index build`");
    }
    let stored_dims: i32 = client
        .query_opt(
            "SELECT atttypmod FROM pg_attribute WHERE attrelid = $1::text::regclass AND attname = 'embedding'",
            &[&table],
        )?
        .map(|r| r.get(0))
        .with_context(|| format!("the table {table} has no `embedding` column: not built by `kiln index build`"))?;
    let (_, mut vectors) = embed(&args.embedder, std::slice::from_ref(&args.text))?;
    let v = vectors.pop().expect("one text, one vector");
    if stored_dims > 0 && stored_dims as usize != v.len() {
        bail!(
            "the table {table} holds {stored_dims}-dimensional vectors but this model{} gives {}: query with the \
             model (and projection) that built it",
            if args.embedder.projection.is_some() { " and projection" } else { "" },
            v.len()
        );
    }
    client.batch_execute(&format!("SET hnsw.ef_search = {}; SET ivfflat.probes = {}", args.ef_search, args.probes))?;
    let rows = client.query(
        &format!(
            "SELECT id, text, (embedding <=> $1)::float8 AS distance FROM {table} ORDER BY embedding <=> $1 LIMIT $2"
        ),
        &[&Vector::from(v), &(args.k as i64)],
    )?;
    Ok(rows.iter().map(|r| Hit { id: r.get(0), text: r.get(1), distance: r.get(2) }).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_plain_identifiers() {
        for ok in ["docs", "_t", "kiln_documents_2"] {
            assert!(check_table(ok).is_ok(), "{ok}");
        }
        for bad in ["", "2docs", "Docs", "a-b", "a;drop table x", "a b", &"x".repeat(64)] {
            assert!(check_table(bad).is_err(), "{bad}");
        }
    }
}
