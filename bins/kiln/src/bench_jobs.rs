//! `kiln bench jobs`: what a job costs end to end, per language, and how many jobs a minute
//! the daemon's queue gets through with and without a warm pool.
//!
//! Against the running daemon:
//! - per language (default: every language whose image is built, per `GET /v1/languages`),
//!   `--runs` hello-world jobs, each submitted only once the language's pool (size 1, no
//!   warm-up, the image's default machine size) has a ready sandbox again, so every run
//!   measures a warm take: `submit_to_result_ms` is client-side wall time from
//!   `POST /v1/jobs` until `GET /v1/jobs/{id}?wait=60` returns the final record;
//!   `warm_runs` counts the runs whose record says `warm`; `job_*_ms_p50` are the medians of
//!   the job's own `timing` (total, acquire, compile, run);
//! - throughput: `--throughput-jobs` Python hello worlds submitted at once (a full queue is
//!   waited out), timed until all are final, with the python pool at size 2
//!   (`jobs_per_min_pool`) and at size 0 (`jobs_per_min_no_pool`), and their ratio.
//!
//! Every job must succeed and print exactly `hello\n`: a wrong result is an error (the bench
//! exits non-zero naming the job), never a number. The pools the bench sets are put back as
//! `GET /v1/pools` showed them at the start (size and warm-up; a pool the bench created is
//! removed again), also when the bench fails.
//!
//! Must not: build images (a language whose image is not built is left out, or refused when
//! named), or assert timings: numbers go to stdout (`--json` for machines) and into
//! docs/benchmarks.md by hand.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use futures_util::future::join_all;
use kiln_api_types::{
    JobInfo, JobRequest, JobStatus, LanguageEntry, MachineSpec, PoolInfo, PoolOrigin,
    PoolSetRequest,
};
use kiln_client::Client;
use serde::Serialize;

use crate::bench::{Summary, summary};
use crate::job_result::{submit, wait_final};

/// The language of the throughput part.
const THROUGHPUT_LANGUAGE: &str = "python";
/// Pool size of the throughput part's pooled half.
const THROUGHPUT_POOL_SIZE: u32 = 2;
/// Run time limit of the bench's jobs, seconds: generous, so that a slow compile (a TCG
/// guest) is measured rather than stopped.
const JOB_TIMEOUT_SECS: u64 = 600;
/// Longest wait for a pool to reach its target.
const POOL_DEADLINE: Duration = Duration::from_secs(300);
/// What every program prints.
const HELLO: &str = "hello\n";

/// Options of `kiln bench jobs`.
#[derive(Debug, Args)]
pub struct JobsBenchArgs {
    /// Jobs per language for the latency part.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Languages of the latency part, comma-separated ids or aliases [default: every
    /// language whose image is built].
    #[arg(long, value_name = "L,..")]
    pub languages: Option<String>,
    /// Python jobs submitted at once for each half of the throughput part (0 skips it).
    #[arg(long, default_value_t = 100)]
    pub throughput_jobs: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// The result.
#[derive(Debug, Default, Serialize)]
pub struct JobsBench {
    /// Jobs per language.
    pub runs: usize,
    /// The languages measured (ids).
    pub languages: Vec<String>,
    /// `POST /v1/jobs` → final record, client-side (ms), per language.
    pub submit_to_result_ms: BTreeMap<String, Summary>,
    /// Runs whose sandbox came from the pool, per language (of `runs`).
    pub warm_runs: BTreeMap<String, usize>,
    /// Median of the job's own `timing.total_ms`, per language.
    pub job_total_ms_p50: BTreeMap<String, Option<f64>>,
    /// Median of `timing.acquire_ms` (taking the sandbox), per language.
    pub job_acquire_ms_p50: BTreeMap<String, Option<f64>>,
    /// Median of `timing.compile_ms` (`null` for interpreted languages).
    pub job_compile_ms_p50: BTreeMap<String, Option<f64>>,
    /// Median of `timing.run_ms`, per language.
    pub job_run_ms_p50: BTreeMap<String, Option<f64>>,
    /// The language's own warm-up (`GET /v1/languages`), per language.
    pub warmup: BTreeMap<String, Vec<String>>,
    /// `submit_to_result_ms` with the pool warming up with the language's own warm-up (the
    /// daemon's default for a language's image) instead of `true`, which the rounds of
    /// `submit_to_result_ms` use (rounds alternate, same machine).
    pub submit_to_result_ms_warmup: BTreeMap<String, Summary>,
    /// `warm_runs` of those rounds.
    pub warm_runs_warmup: BTreeMap<String, usize>,
    /// `job_run_ms_p50` of those rounds.
    pub job_run_ms_p50_warmup: BTreeMap<String, Option<f64>>,
    /// Jobs per throughput half (0: skipped).
    pub throughput_jobs: usize,
    /// Python jobs per minute, submitted at once, with a pool of 2.
    pub jobs_per_min_pool: Option<f64>,
    /// Likewise with no pool.
    pub jobs_per_min_no_pool: Option<f64>,
    /// `jobs_per_min_pool / jobs_per_min_no_pool`.
    pub throughput_pool_vs_no_pool: Option<f64>,
    /// Jobs of the pooled half whose sandbox came from the pool.
    pub throughput_warm_jobs: Option<usize>,
    /// Failed throughput jobs (always 0 in a result: any failure fails the bench).
    pub throughput_failures: usize,
}

/// The hello-world program of a language id, if the bench has one.
fn hello_program(language: &str) -> Option<&'static str> {
    Some(match language {
        "python" => "print('hello')\n",
        "node" => "console.log('hello')\n",
        "ruby" => "puts 'hello'\n",
        "go" => "package main\n\nimport \"fmt\"\n\nfunc main() {\n\tfmt.Println(\"hello\")\n}\n",
        "rust" => "fn main() {\n    println!(\"hello\");\n}\n",
        "c" => "#include <stdio.h>\n\nint main(void) {\n    puts(\"hello\");\n    return 0;\n}\n",
        "cpp" => {
            "#include <iostream>\n\nint main() {\n    std::cout << \"hello\\n\";\n    return 0;\n}\n"
        }
        "bash" => "echo hello\n",
        _ => return None,
    })
}

/// `--languages python,go,...` as names, in order; empty names and repeats are errors.
fn parse_languages(arg: &str) -> anyhow::Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for name in arg.split(',').map(str::trim) {
        if name.is_empty() {
            bail!("--languages {arg:?}: an empty name (expected L,L,...)");
        }
        if out.iter().any(|n| n == name) {
            bail!("--languages {arg:?}: {name} is given twice");
        }
        out.push(name.to_owned());
    }
    Ok(out)
}

/// The languages to measure: the ones named (by id or alias; each must be known, built and
/// have a program here), or every built one with a program.
fn select_languages(
    named: Option<&[String]>,
    known: &[LanguageEntry],
) -> anyhow::Result<Vec<LanguageEntry>> {
    let Some(named) = named else {
        let built: Vec<LanguageEntry> = known
            .iter()
            .filter(|l| l.image_built && hello_program(&l.id).is_some())
            .cloned()
            .collect();
        if built.is_empty() {
            bail!("no language's image is built (see `kiln job languages`)");
        }
        return Ok(built);
    };
    let mut out: Vec<LanguageEntry> = Vec::new();
    for name in named {
        let Some(l) = known
            .iter()
            .find(|l| l.id == *name || l.aliases.iter().any(|a| a == name))
        else {
            let ids: Vec<&str> = known.iter().map(|l| l.id.as_str()).collect();
            bail!(
                "--languages: unknown language {name:?} (known: {})",
                ids.join(", ")
            );
        };
        if !l.image_built {
            bail!(
                "--languages: the image {} of {} is not built (kiln image build {})",
                l.image,
                l.id,
                l.image
            );
        }
        if hello_program(&l.id).is_none() {
            bail!(
                "--languages: the bench has no hello-world program for {}",
                l.id
            );
        }
        if out.iter().any(|o| o.id == l.id) {
            bail!("--languages: {name} names {} again", l.id);
        }
        out.push(l.clone());
    }
    Ok(out)
}

/// Whether `job` is a correct hello world: succeeded and printed exactly [`HELLO`]; the
/// error names the job and what was wrong.
fn check(job: &JobInfo) -> anyhow::Result<()> {
    if job.status != JobStatus::Succeeded {
        let why = job
            .error
            .clone()
            .or_else(|| job.compile.as_ref().map(|c| c.output.clone()))
            .unwrap_or_else(|| format!("stderr {:?}", job.stderr));
        bail!(
            "job {} ({}) ended {}: {}",
            job.id,
            job.language,
            job.status,
            why.trim_end()
        );
    }
    if job.stdout != HELLO {
        bail!(
            "job {} ({}) printed {:?} instead of {HELLO:?} (stderr {:?})",
            job.id,
            job.language,
            job.stdout,
            job.stderr
        );
    }
    Ok(())
}

/// Median of the samples that exist (`None` if none does).
fn p50_of(samples: impl Iterator<Item = Option<u64>>) -> Option<f64> {
    let mut v: Vec<f64> = samples.flatten().map(|m| m as f64).collect();
    (!v.is_empty()).then(|| summary(&mut v).p50)
}

/// Jobs per minute: `jobs` finished in `elapsed`.
fn per_minute(jobs: usize, elapsed: Duration) -> f64 {
    jobs as f64 * 60.0 / elapsed.as_secs_f64()
}

/// The pools the bench changed, to put back as they were.
struct Pools {
    /// `GET /v1/pools` at the start.
    before: Vec<PoolInfo>,
    /// (image, machine) of every pool the bench set.
    touched: Vec<(String, MachineSpec)>,
}

impl Pools {
    /// Sets the pool of `image` at its default machine size to `size` with `warmup` (`None`:
    /// the daemon's default, `true`); returns that machine size.
    async fn set(
        &mut self,
        client: &Client,
        image: &str,
        size: u32,
        warmup: Option<Vec<String>>,
    ) -> anyhow::Result<MachineSpec> {
        let req = PoolSetRequest {
            size,
            cpus: None,
            memory_mib: None,
            warmup,
            warmup_timeout_secs: None,
        };
        let info = client
            .pool_set(image, &req)
            .await
            .with_context(|| format!("setting the pool of {image} to {size}"))?;
        let key = (image.to_owned(), info.machine);
        if !self.touched.contains(&key) {
            self.touched.push(key);
        }
        Ok(info.machine)
    }

    /// Puts every pool the bench set back as it was (a pool that did not exist: size 0).
    async fn restore(&self, client: &Client) -> anyhow::Result<()> {
        let mut failed = Vec::new();
        for (image, machine) in &self.touched {
            let was = self
                .before
                .iter()
                .find(|p| p.image.as_str() == image && p.machine == *machine);
            if was.is_some_and(|p| p.origin == PoolOrigin::Config) {
                eprintln!(
                    "kiln: the pool of {image} came from config.toml; it is now set through \
                     the API at its old size"
                );
            }
            let req = PoolSetRequest {
                size: was.map_or(0, |p| p.size),
                cpus: Some(machine.cpus),
                memory_mib: Some(machine.memory_mib),
                warmup: was.and_then(|p| p.warmup.clone()),
                warmup_timeout_secs: None,
            };
            if let Err(e) = client.pool_set(image, &req).await {
                failed.push(format!("{image}: {e}"));
            }
        }
        if !failed.is_empty() {
            bail!("putting the pools back failed: {}", failed.join("; "));
        }
        Ok(())
    }
}

/// Waits until the pool of `image` at `machine` has `ready` sandboxes ready, or, for 0,
/// none left at all.
async fn wait_pool(
    client: &Client,
    image: &str,
    machine: &MachineSpec,
    ready: u32,
) -> anyhow::Result<()> {
    let t = Instant::now();
    loop {
        let pool = client
            .pool_list()
            .await?
            .pools
            .into_iter()
            .find(|p| p.image.as_str() == image && p.machine == *machine);
        let done = match &pool {
            Some(p) if ready == 0 => p.ready == 0 && p.filling == 0,
            Some(p) => p.ready >= ready,
            None => ready == 0,
        };
        if done {
            return Ok(());
        }
        if t.elapsed() > POOL_DEADLINE {
            let last = pool
                .and_then(|p| p.last_error)
                .map_or(String::new(), |e| format!(" (last refill error: {e})"));
            bail!(
                "the pool of {image} did not reach {ready} ready within {} s{last}",
                POOL_DEADLINE.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn request(language: &str) -> anyhow::Result<JobRequest> {
    let code = hello_program(language)
        .with_context(|| format!("no hello-world program for {language}"))?;
    let mut req = JobRequest::new(language, code);
    req.timeout = Some(JOB_TIMEOUT_SECS);
    Ok(req)
}

/// Runs `kiln bench jobs`.
pub async fn run(client: &Client, a: &JobsBenchArgs) -> anyhow::Result<i32> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let named = a.languages.as_deref().map(parse_languages).transpose()?;
    let known = client.language_list().await?.languages;
    let langs = select_languages(named.as_deref(), &known)?;
    let python = if a.throughput_jobs > 0 {
        let p = known
            .iter()
            .find(|l| l.id == THROUGHPUT_LANGUAGE)
            .with_context(|| format!("the daemon has no language {THROUGHPUT_LANGUAGE}"))?;
        if !p.image_built {
            bail!(
                "the throughput part runs {THROUGHPUT_LANGUAGE} jobs, and the image {} is not \
                 built (build it, or --throughput-jobs 0)",
                p.image
            );
        }
        Some(p.clone())
    } else {
        None
    };
    let mut pools = Pools {
        before: client.pool_list().await?.pools,
        touched: Vec::new(),
    };
    let result = bench(client, a, &langs, python.as_ref(), &mut pools).await;
    pools
        .restore(client)
        .await
        .context("putting the pools back as they were")?;
    let out = result?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!("{}", text(&out));
    }
    Ok(0)
}

async fn bench(
    client: &Client,
    a: &JobsBenchArgs,
    langs: &[LanguageEntry],
    python: Option<&LanguageEntry>,
    pools: &mut Pools,
) -> anyhow::Result<JobsBench> {
    let told = Cell::new(false);
    let mut out = JobsBench {
        runs: a.runs,
        languages: langs.iter().map(|l| l.id.clone()).collect(),
        throughput_jobs: a.throughput_jobs,
        ..JobsBench::default()
    };
    for lang in langs {
        let req = request(&lang.id)?;
        // Rounds alternate the pool's warm-up: `true` (the agent's exec path only), then the
        // language's own (its toolchain once: the daemon's default for a language's image),
        // so both meet the same machine.
        let (mut latency, mut jobs) = (Vec::new(), Vec::new());
        let (mut latency_w, mut jobs_w) = (Vec::new(), Vec::new());
        for run in 0..a.runs * 2 {
            let toolchain = run % 2 == 1;
            let warmup = if toolchain {
                lang.warmup.clone()
            } else {
                vec!["true".to_owned()]
            };
            // The refill after the last round warmed up the other way: empty the pool first.
            let machine = pools.set(client, &lang.image, 0, None).await?;
            wait_pool(client, &lang.image, &machine, 0).await?;
            pools.set(client, &lang.image, 1, Some(warmup)).await?;
            wait_pool(client, &lang.image, &machine, 1).await?;
            let t = Instant::now();
            let id = submit(client, &req, &told).await?;
            let job = wait_final(client, &id).await?;
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            check(&job)?;
            if !a.json {
                eprintln!(
                    "{} {}/{} ({} warm-up): {ms:.0} ms{}",
                    lang.id,
                    run / 2 + 1,
                    a.runs,
                    if toolchain { "toolchain" } else { "`true`" },
                    if job.warm { "" } else { " (not warm)" }
                );
            }
            if toolchain {
                latency_w.push(ms);
                jobs_w.push(job);
            } else {
                latency.push(ms);
                jobs.push(job);
            }
        }
        // Free the language's pooled VM before the next language (put back at the end).
        pools.set(client, &lang.image, 0, None).await?;
        let id = lang.id.clone();
        out.submit_to_result_ms
            .insert(id.clone(), summary(&mut latency));
        out.warm_runs
            .insert(id.clone(), jobs.iter().filter(|j| j.warm).count());
        let p50 = |f: fn(&JobInfo) -> Option<u64>| p50_of(jobs.iter().map(f));
        out.job_total_ms_p50
            .insert(id.clone(), p50(|j| j.timing.total_ms));
        out.job_acquire_ms_p50
            .insert(id.clone(), p50(|j| j.timing.acquire_ms));
        out.job_compile_ms_p50
            .insert(id.clone(), p50(|j| j.timing.compile_ms));
        out.job_run_ms_p50
            .insert(id.clone(), p50(|j| j.timing.run_ms));
        out.warmup.insert(id.clone(), lang.warmup.clone());
        out.submit_to_result_ms_warmup
            .insert(id.clone(), summary(&mut latency_w));
        out.warm_runs_warmup
            .insert(id.clone(), jobs_w.iter().filter(|j| j.warm).count());
        out.job_run_ms_p50_warmup
            .insert(id, p50_of(jobs_w.iter().map(|j| j.timing.run_ms)));
    }
    if let Some(py) = python {
        let req = request(&py.id)?;
        let machine = pools
            .set(client, &py.image, THROUGHPUT_POOL_SIZE, None)
            .await?;
        wait_pool(client, &py.image, &machine, THROUGHPUT_POOL_SIZE).await?;
        let (elapsed, jobs) = burst(client, &req, a.throughput_jobs, &told).await?;
        let pooled = per_minute(jobs.len(), elapsed);
        out.throughput_warm_jobs = Some(jobs.iter().filter(|j| j.warm).count());
        if !a.json {
            eprintln!("throughput with a pool of {THROUGHPUT_POOL_SIZE}: {pooled:.1} jobs/min");
        }
        pools.set(client, &py.image, 0, None).await?;
        wait_pool(client, &py.image, &machine, 0).await?;
        let (elapsed, jobs) = burst(client, &req, a.throughput_jobs, &told).await?;
        let bare = per_minute(jobs.len(), elapsed);
        if !a.json {
            eprintln!("throughput with no pool: {bare:.1} jobs/min");
        }
        out.jobs_per_min_pool = Some(pooled);
        out.jobs_per_min_no_pool = Some(bare);
        out.throughput_pool_vs_no_pool = Some(pooled / bare);
    }
    Ok(out)
}

/// Submits `n` copies of `req` at once and waits for all; the time from the first submit to
/// the last end, and the jobs. Any job that is not a correct hello world fails it, naming
/// how many failed and the first few.
async fn burst(
    client: &Client,
    req: &JobRequest,
    n: usize,
    told: &Cell<bool>,
) -> anyhow::Result<(Duration, Vec<JobInfo>)> {
    let t = Instant::now();
    let ids: Vec<_> = join_all((0..n).map(|_| submit(client, req, told)))
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    let jobs: Vec<JobInfo> = join_all(ids.iter().map(|id| wait_final(client, id)))
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    let elapsed = t.elapsed();
    let failures: Vec<String> = jobs
        .iter()
        .filter_map(|j| check(j).err().map(|e| e.to_string()))
        .collect();
    if !failures.is_empty() {
        bail!(
            "{} of {n} throughput jobs failed: {}",
            failures.len(),
            failures
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    Ok((elapsed, jobs))
}

/// The readable report.
fn text(b: &JobsBench) -> String {
    let opt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0}"));
    let mut s = format!(
        "kiln bench jobs: {} runs per language and warm-up, each a warm take from a pool of 1\n\
         {:<8} {:>10} {:>10} {:>6}   job's own p50 (ms): {:>7} {:>8} {:>8} {:>6}   \
         toolchain warm-up: {:>7} {:>6}\n",
        b.runs,
        "LANGUAGE",
        "P50 MS",
        "P95 MS",
        "WARM",
        "TOTAL",
        "ACQUIRE",
        "COMPILE",
        "RUN",
        "P50 MS",
        "RUN"
    );
    for id in &b.languages {
        let (Some(lat), Some(warm)) = (b.submit_to_result_ms.get(id), b.warm_runs.get(id)) else {
            continue;
        };
        let get = |m: &BTreeMap<String, Option<f64>>| opt(m.get(id).copied().flatten());
        s.push_str(&format!(
            "{id:<8} {:>10.1} {:>10.1} {:>6}   {:>26} {:>8} {:>8} {:>6}   {:>26} {:>6}\n",
            lat.p50,
            lat.p95,
            format!("{warm}/{}", lat.n),
            get(&b.job_total_ms_p50),
            get(&b.job_acquire_ms_p50),
            get(&b.job_compile_ms_p50),
            get(&b.job_run_ms_p50),
            opt(b.submit_to_result_ms_warmup.get(id).map(|l| l.p50)),
            get(&b.job_run_ms_p50_warmup),
        ));
    }
    if let (Some(pool), Some(bare), Some(ratio)) = (
        b.jobs_per_min_pool,
        b.jobs_per_min_no_pool,
        b.throughput_pool_vs_no_pool,
    ) {
        s.push_str(&format!(
            "throughput, {} python jobs at once: {pool:.1} jobs/min with a pool of \
             {THROUGHPUT_POOL_SIZE} ({} warm), {bare:.1} with none: {ratio:.2}x\n",
            b.throughput_jobs,
            b.throughput_warm_jobs.unwrap_or(0),
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_api_types::JobCompile;

    fn lang(id: &str, aliases: &[&str], built: bool) -> LanguageEntry {
        LanguageEntry {
            id: id.into(),
            name: id.to_uppercase(),
            aliases: aliases.iter().map(|a| (*a).into()).collect(),
            image: id.into(),
            compiled: false,
            source_file: "main".into(),
            warmup: vec!["true".into()],
            image_built: built,
            version: None,
        }
    }

    #[test]
    fn parse_languages_keeps_order_and_refuses_empty_and_repeated_names() {
        assert_eq!(
            parse_languages("python, go,rust").unwrap(),
            ["python", "go", "rust"]
        );
        let e = parse_languages("python,,go").unwrap_err().to_string();
        assert!(e.contains("empty name"), "{e}");
        let e = parse_languages("").unwrap_err().to_string();
        assert!(e.contains("empty name"), "{e}");
        let e = parse_languages("go,go").unwrap_err().to_string();
        assert!(e.contains("go is given twice"), "{e}");
    }

    #[test]
    fn select_languages_defaults_to_built_ones_and_checks_named_ones() {
        let known = [
            lang("python", &["py"], true),
            lang("rust", &["rs"], false),
            lang("cobol", &[], true),
            lang("bash", &["sh"], true),
        ];
        let ids = |v: Vec<LanguageEntry>| v.into_iter().map(|l| l.id).collect::<Vec<_>>();
        // Default: built and with a program (cobol has none, rust is not built).
        assert_eq!(
            ids(select_languages(None, &known).unwrap()),
            ["python", "bash"]
        );
        // Aliases resolve, the order is the caller's.
        let named = ["sh".to_owned(), "py".to_owned()];
        assert_eq!(
            ids(select_languages(Some(&named), &known).unwrap()),
            ["bash", "python"]
        );
        for (name, says) in [
            ("rs", "image rust of rust is not built"),
            ("perl", "unknown language \"perl\""),
            ("cobol", "no hello-world program for cobol"),
        ] {
            let e = select_languages(Some(&[name.to_owned()]), &known)
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{name}: {e}");
        }
        let e = select_languages(Some(&["py".into(), "python".into()]), &known)
            .unwrap_err()
            .to_string();
        assert!(e.contains("names python again"), "{e}");
        let none_built = [lang("python", &[], false)];
        assert!(select_languages(None, &none_built).is_err());
    }

    #[test]
    fn every_language_of_kiln_has_a_hello_world() {
        for id in ["python", "node", "ruby", "go", "rust", "c", "cpp", "bash"] {
            let p = hello_program(id).unwrap_or_else(|| panic!("{id}"));
            assert!(p.contains("hello"), "{id}");
            assert_eq!(request(id).unwrap().timeout, Some(JOB_TIMEOUT_SECS));
        }
        assert!(hello_program("cobol").is_none());
    }

    fn job(status: JobStatus, stdout: &str) -> JobInfo {
        JobInfo {
            status,
            exit_code: Some(0),
            stdout: stdout.into(),
            warm: true,
            ..JobInfo::queued("job-00000000abcd".parse().unwrap(), "go", 1, 30, 1 << 20)
        }
    }

    #[test]
    fn check_accepts_only_a_successful_exact_hello() {
        check(&job(JobStatus::Succeeded, "hello\n")).unwrap();
        let e = check(&job(JobStatus::Succeeded, "hello")).unwrap_err();
        assert!(
            e.to_string()
                .contains("job-00000000abcd (go) printed \"hello\""),
            "{e}"
        );
        let mut bad = job(JobStatus::Failed, "");
        bad.compile = Some(JobCompile {
            exit_code: Some(1),
            output: "main.go:3: undefined: fmt\n".into(),
            output_truncated: false,
        });
        let e = check(&bad).unwrap_err().to_string();
        assert!(
            e.ends_with("ended failed: main.go:3: undefined: fmt"),
            "{e}"
        );
        let mut err = job(JobStatus::Error, "");
        err.error = Some("image go is not built".into());
        let e = check(&err).unwrap_err().to_string();
        assert!(e.contains("ended error: image go is not built"), "{e}");
    }

    #[test]
    fn medians_skip_missing_steps_and_rates_are_per_minute() {
        assert_eq!(
            p50_of([Some(10), None, Some(30), Some(20)].into_iter()),
            Some(20.0)
        );
        assert_eq!(p50_of([None, None].into_iter()), None);
        assert_eq!(per_minute(100, Duration::from_secs(30)), 200.0);
    }

    #[test]
    fn text_report_has_a_row_per_language_and_the_ratio() {
        let mut b = JobsBench {
            runs: 2,
            languages: vec!["python".into()],
            throughput_jobs: 100,
            jobs_per_min_pool: Some(300.0),
            jobs_per_min_no_pool: Some(100.0),
            throughput_pool_vs_no_pool: Some(3.0),
            throughput_warm_jobs: Some(40),
            ..JobsBench::default()
        };
        b.submit_to_result_ms
            .insert("python".into(), summary(&mut [50.0, 70.0]));
        b.warm_runs.insert("python".into(), 2);
        b.job_total_ms_p50.insert("python".into(), Some(45.0));
        b.job_compile_ms_p50.insert("python".into(), None);
        b.submit_to_result_ms_warmup
            .insert("python".into(), summary(&mut [20.0, 30.0]));
        b.job_run_ms_p50_warmup.insert("python".into(), Some(12.0));
        let t = text(&b);
        let row: Vec<&str> = t.lines().nth(2).unwrap().split_whitespace().collect();
        assert_eq!(
            row,
            [
                "python", "50.0", "70.0", "2/2", "45", "-", "-", "-", "20", "12"
            ],
            "{t}"
        );
        assert!(
            t.contains("300.0 jobs/min with a pool of 2 (40 warm), 100.0 with none: 3.00x"),
            "{t}"
        );
    }
}
