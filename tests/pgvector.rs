//! `kiln index` against a real PostgreSQL + pgvector: the test creates a throwaway cluster in a
//! temp dir (initdb; the server listens only on a unix socket in that dir), indexes a small
//! corpus with the tiny sentence-transformers fixture through the real `kiln` binary, and
//! checks each query's neighbours against a brute-force cosine ranking computed here over the
//! stored vectors. Then the server is stopped and the dir removed.
//!
//! Needs PostgreSQL's server binaries (`initdb`, `pg_ctl`: /usr/lib/postgresql/*/bin or PATH)
//! and the pgvector extension. Without them the test FAILS with install instructions, unless
//! KILN_SKIP_PG=1 says to skip it. As root (CI containers) the cluster runs as the `postgres`
//! user through `runuser`, since initdb refuses root.

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln::corpus::CorpusEmbedder;
use kiln_models::DeviceSpec;
use postgres::{Client, NoTls};
use serde_json::Value;

const INSTALL: &str = "Install PostgreSQL and pgvector (Debian/Ubuntu: `apt-get install postgresql \
     postgresql-15-pgvector` from the PGDG repository, or build pgvector from source as .ci/run does), \
     or set KILN_SKIP_PG=1 to skip this test.";

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bert-tiny-st")
}

fn skip() -> bool {
    if std::env::var("KILN_SKIP_PG").is_ok_and(|v| v == "1") {
        eprintln!("KILN_SKIP_PG=1: skipping the PostgreSQL + pgvector test");
        return true;
    }
    false
}

/// The folder holding initdb and pg_ctl: the newest /usr/lib/postgresql/N/bin, else PATH.
fn pg_bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin): &(u32, PathBuf)| bin.join("initdb").exists())
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return bin;
    }
    std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists()))
        .unwrap_or_else(|| {
            panic!("PostgreSQL's initdb/pg_ctl were not found (/usr/lib/postgresql/*/bin, PATH). {INSTALL}")
        })
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A PostgreSQL server on a unix socket in a temp dir; stopped and removed on drop.
struct TempPostgres {
    dir: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
    port: u16,
}

impl TempPostgres {
    fn command(&self, program: &str) -> Command {
        let exe = self.bin.join(program);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn run(&self, program: &str, args: &[&str]) {
        let out = self.command(program).args(args).output().unwrap_or_else(|e| panic!("running {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed:\n{}\n{}\nlog: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
        );
    }

    fn start() -> TempPostgres {
        let bin = pg_bin_dir();
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        // Short: the socket path must stay under ~100 bytes.
        let dir = PathBuf::from(format!("/tmp/kiln-pg-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let as_postgres = is_root();
        if as_postgres {
            let ok =
                Command::new("chown").args(["postgres:", dir.to_str().unwrap()]).status().is_ok_and(|s| s.success());
            assert!(ok, "running as root: initdb refuses root and there is no `postgres` user to run it as. {INSTALL}");
        }
        let pg = TempPostgres { dir, bin, as_postgres, port: 5432 };
        let data = pg.dir.join("data");
        pg.run("initdb", &["-D", data.to_str().unwrap(), "-U", "kiln", "-A", "trust", "-E", "UTF8", "--no-sync"]);
        let opts = format!("-k {} -p {} -c listen_addresses='' -c fsync=off", pg.dir.display(), pg.port);
        let log = pg.dir.join("log");
        pg.run("pg_ctl", &["-D", data.to_str().unwrap(), "-l", log.to_str().unwrap(), "-o", &opts, "-w", "start"]);
        pg
    }

    fn url(&self) -> String {
        format!("host={} port={} user=kiln dbname=postgres", self.dir.display(), self.port)
    }

    fn client(&self) -> Client {
        Client::connect(&self.url(), NoTls).unwrap()
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = self.command("pg_ctl").args(["-D", data.to_str().unwrap(), "-m", "immediate", "-w", "stop"]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn corpus() -> Vec<String> {
    let subjects = ["the cat", "a dog", "my friend", "the teacher", "a small bird"];
    let verbs = ["sees", "likes", "reads about", "walks to", "talks with", "waits for", "draws", "hears"];
    let objects = ["the house", "a red car", "the river", "some books", "the city"];
    (0..40).map(|i| format!("{} {} {}", subjects[i % 5], verbs[(i / 5) % 8], objects[(i * 3 + i / 5) % 5])).collect()
}

fn kiln(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).env("RUST_LOG", "warn").output().unwrap()
}

fn kiln_ok(args: &[&str]) -> String {
    let out = kiln(args);
    assert!(out.status.success(), "kiln {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn kiln_err(args: &[&str]) -> String {
    let out = kiln(args);
    assert!(!out.status.success(), "kiln {args:?} succeeded:\n{}", String::from_utf8_lossy(&out.stdout));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// Checks `kiln index query` for `text` against the brute-force ranking of `stored`.
fn check_query(
    model_args: &[&str],
    db_args: &[&str],
    text: &str,
    k: usize,
    query_vec: &[f32],
    stored: &[(i64, Vec<f32>)],
) {
    let mut args = vec!["index", "query", "--text", text, "--json"];
    let k_str = k.to_string();
    args.extend(["--top-k", &k_str]);
    args.extend(model_args);
    args.extend(db_args);
    let out: Value = serde_json::from_str(&kiln_ok(&args)).unwrap();
    let got: Vec<(i64, f64)> = out["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h["id"].as_i64().unwrap(), h["distance"].as_f64().unwrap()))
        .collect();
    let mut want: Vec<(i64, f64)> = stored.iter().map(|(id, v)| (*id, 1.0 - cosine(query_vec, v))).collect();
    want.sort_by(|a, b| a.1.total_cmp(&b.1));
    want.truncate(k);
    let ids = |v: &[(i64, f64)]| v.iter().map(|h| h.0).collect::<Vec<_>>();
    assert_eq!(ids(&got), ids(&want), "neighbours of {text:?}: got {got:?}, brute force {want:?}");
    for ((_, g), (_, w)) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-5, "distance {g} vs {w} for {text:?}");
    }
}

#[test]
fn index_and_query_with_pgvector() {
    if skip() {
        return;
    }
    let pg = TempPostgres::start();
    let mut client = pg.client();
    if let Err(e) = client.batch_execute("CREATE EXTENSION IF NOT EXISTS vector") {
        panic!("the pgvector extension is not available in this PostgreSQL ({e:?}). {INSTALL}");
    }

    let dir = pg.dir.clone();
    let corpus_file = dir.join("corpus.txt");
    let texts = corpus();
    std::fs::write(&corpus_file, texts.join("\n")).unwrap();
    let url = pg.url();
    let model = fixture();
    let model_args = ["--model", model.to_str().unwrap(), "--device", "cpu"];
    let db = |table: &'static str| ["--database", url.as_str(), "--table", table];
    let build = |table: &'static str, extra: &[&str]| {
        let mut args = vec!["index", "build", "--corpus", corpus_file.to_str().unwrap()];
        args.extend(model_args);
        args.extend(db(table));
        args.extend(extra);
        args.into_iter().map(str::to_string).collect::<Vec<_>>()
    };

    let out = kiln_ok(&refs(&build("docs", &[])));
    assert!(out.contains("indexed 40 texts into docs (32 dimensions, HNSW cosine index)"), "{out}");

    // The stored rows: every text, and the vectors this process computes for them.
    let embedder = CorpusEmbedder::load(&model, DeviceSpec::Cpu, 8192).unwrap();
    let mine = embedder.embed(&texts, None).unwrap();
    let rows = client.query("SELECT id, text, embedding FROM docs ORDER BY id", &[]).unwrap();
    assert_eq!(rows.len(), texts.len());
    let stored: Vec<(i64, Vec<f32>)> =
        rows.iter().map(|r| (r.get::<_, i64>(0), r.get::<_, pgvector::Vector>(2).to_vec())).collect();
    for (i, r) in rows.iter().enumerate() {
        assert_eq!((r.get::<_, i64>(0), r.get::<_, String>(1)), (i as i64, texts[i].clone()));
        for (a, b) in stored[i].1.iter().zip(&mine[i]) {
            assert!((a - b).abs() < 1e-6, "stored vector {i}");
        }
    }
    let index: String = client
        .query_one("SELECT indexdef FROM pg_indexes WHERE tablename = 'docs' AND indexname = 'docs_embedding_idx'", &[])
        .unwrap()
        .get(0);
    assert!(index.contains("hnsw") && index.contains("vector_cosine_ops"), "{index}");

    let queries = ["the cat sees the river", "a bird walks to a car", "books about the city", "hello world"];
    let query_vecs = embedder.embed(&queries.iter().map(|q| q.to_string()).collect::<Vec<_>>(), None).unwrap();
    for (q, v) in queries.iter().zip(&query_vecs) {
        check_query(&model_args, &db("docs"), q, 5, v, &stored);
    }
    // k larger than the table: every row, ranked.
    check_query(&model_args, &db("docs"), queries[0], 50, &query_vecs[0], &stored);

    // IVFFlat (one list at this size: exact) gives the same answers.
    let out = kiln_ok(&refs(&build("docs_ivf", &["--index", "ivfflat"])));
    assert!(out.contains("IVFFlat"), "{out}");
    check_query(&model_args, &db("docs_ivf"), queries[1], 5, &query_vecs[1], &stored);

    // With a PCA projection: 8-dimensional rows, queried through the same projection.
    let proj = dir.join("pca8.safetensors");
    kiln_ok(&[
        "pca",
        "fit",
        "--model",
        model.to_str().unwrap(),
        "--corpus",
        corpus_file.to_str().unwrap(),
        "--dims",
        "8",
        "--out",
        proj.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    let out = kiln_ok(&refs(&build("docs_pca", &["--projection", proj.to_str().unwrap()])));
    assert!(out.contains("(8 dimensions"), "{out}");
    let projection = kiln::pca::Projection::load(&proj).unwrap();
    let stored_pca: Vec<(i64, Vec<f32>)> = stored.iter().map(|(id, v)| (*id, projection.apply(v, true))).collect();
    let with_proj = [model_args.as_slice(), &["--projection", proj.to_str().unwrap()]].concat();
    check_query(&with_proj, &db("docs_pca"), queries[2], 5, &projection.apply(&query_vecs[2], true), &stored_pca);

    // Clear errors.
    let err = kiln_err(&refs(&build("docs", &[])));
    assert!(err.contains("already exists") && err.contains("--recreate"), "{err}");
    let mut q = vec!["index", "query", "--text", "x"];
    q.extend(model_args);
    let err = kiln_err(&[q.as_slice(), &db("nothing_here")].concat());
    assert!(err.contains("does not exist"), "{err}");
    let err = kiln_err(&[q.as_slice(), &db("docs_pca")].concat());
    assert!(err.contains("holds 8-dimensional vectors") && err.contains("gives 32"), "{err}");
    let err = kiln_err(&[q.as_slice(), &["--database", url.as_str(), "--table", "Bad-Name"]].concat());
    assert!(err.contains("lowercase"), "{err}");
    let bad_db = format!("host={} port=1 user=kiln dbname=postgres", dir.display());
    let err = kiln_err(&[q.as_slice(), &["--database", bad_db.as_str()]].concat());
    assert!(err.contains("connecting to PostgreSQL"), "{err}");
    // --recreate replaces the table.
    let out = kiln_ok(&refs(&build("docs", &["--recreate", "--index", "none"])));
    assert!(out.contains("indexed 40 texts into docs (32 dimensions, no cosine index)"), "{out}");
    check_query(&model_args, &db("docs"), queries[3], 3, &query_vecs[3], &stored);
}
