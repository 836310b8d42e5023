//! Encodes a tensor larger than memory should hold a piece of rows at a
//! time, with the same bytes as [`crate::encode_tensor`] on the whole.
//!
//! Most chains code every row on its own: a Hadamard rotation mixes values
//! within a row with signs drawn from the tensor's seed; round-to-nearest,
//! ternary in groups and casts look at one group of a row at a time; the
//! entropy coders come after the quantizer and see only its parts. For
//! such a chain, the parts of consecutive row pieces laid end to end are
//! the whole tensor's parts, byte for byte, provided each piece's codes
//! fill whole bytes (pieces of a multiple of 40 rows: eight 1-bit codes or
//! five trits to a byte). So a tensor of any size is encoded with one
//! piece's values in memory, plus the parts; the entropy coders then run
//! once over the joined parts, as they would have over the whole tensor's.
//!
//! `uniform` has two tensor-wide parameters, its step (searched on a strided
//! sample of the whole tensor) and its reconstruction offsets (the centroid
//! of every value coded with each magnitude). Encoded by rows, they are
//! fitted first in two passes over the pieces — one gathers the sample the
//! whole tensor's search would see, one tallies the codes at the step found
//! (exact integer sums, so the pieces add up to the whole tensor's figures
//! bit for bit) — and every piece is then coded with them; a piece's source
//! is read three times. `ternary` without a group has one scale for the
//! tensor, the mean magnitude: one pass carries the sum from piece to piece
//! in the order the whole encode adds it, so a piece's source is read
//! twice; its one-value `scales` part is the tensor's, kept once.
//! `nonuniform`'s learned levels come from a strided sample, gathered as
//! `uniform`'s is; `vq`'s codebooks from seeded subsamples of the tensor's
//! vectors, whose places are drawn before any piece is read (a tensor with
//! at most 256 vectors an entry trains on all of them and is encoded
//! whole). Their levels and codebooks are parts of the tensor, kept once.
//! `seedlm`'s exponent range follows the largest block, a maximum over the
//! pieces. A `sparse` stage masks each row on its own and passes the row's
//! kept values on, so it may come before any of these quantizers.
//!
//! Each piece is encoded, decoded and measured by [`crate::encode_tensor`]
//! (the verification every tensor gets); the entropy stages are checked by
//! decoding their output back to the joined parts. The step records are the
//! whole tensor's: sizes and squared errors summed over the pieces, the
//! quantizer's share set from the final error as the chain sets it.

use std::time::Instant;

use hcx_protocol::manifest::StepRecord;
use hcx_protocol::stage::{StageCategory, StageSpec};
use serde_json::json;

use crate::chain::{EncodedTensor, encode_tensor_with, settle_quantizer_share};
use crate::rng::SplitMix64;
use crate::stats::{energy, sqnr_from, squared_error};
use crate::uniform::{self, ChunkTally, UniformMeta};
use crate::{KernelError, Part, entropy, nonuniform, vq};
use hcx_protocol::stage::{LevelSource, NonuniformSpec, SeedlmSpec, UniformSpec, VqSpec};

/// Rows in a piece are a multiple of this: 8 (1-bit codes packed eight to
/// a byte) times 5 (trits packed five to a byte).
pub const ROW_MULTIPLE: usize = 40;

/// Whether `stages` code every row of a tensor independently of the other
/// rows, given parameters [`encode_by_rows`] can fit over the pieces first,
/// so that it gives the whole tensor's bytes: Hadamard rotations and
/// `sparse` masks (per row), then one of `rtn`, `cast`, `ternary`,
/// `uniform`, `nonuniform`, `vq` or `seedlm`
/// (`uniform`'s step and offsets, `ternary`'s one scale without a group,
/// `nonuniform`'s learned levels, `vq`'s codebooks and `seedlm`'s exponent
/// range are fitted over every piece before any is coded), then entropy
/// coders. Chains with other tensor-wide parameters (a low-rank factor, a
/// Hessian) are encoded whole. Every such chain decodes by rows; see
/// [`encodes_by_rows`] for which tensors it encodes by rows.
pub fn codes_rows_independently(stages: &[StageSpec]) -> bool {
    let mut quantizers = 0;
    for s in stages {
        match s {
            StageSpec::Hadamard(_) | StageSpec::Zstd(_) | StageSpec::Rans(_) => {}
            // A mask per row; the rows' kept values go on.
            StageSpec::Sparse(_) if quantizers == 0 => {}
            StageSpec::Rtn(_)
            | StageSpec::Cast(_)
            | StageSpec::Uniform(_)
            | StageSpec::Ternary(_)
            | StageSpec::Nonuniform(_)
            | StageSpec::Vq(_)
            | StageSpec::Seedlm(_) => quantizers += 1,
            _ => return false,
        }
    }
    quantizers == 1
}

/// Whether [`encode_by_rows`] can encode a tensor of `shape` through
/// `stages`: a chain that [`codes_rows_independently`] whose `vq`
/// codebooks, if any, train on a subsample of the vectors they see (a
/// tensor of at most 256 vectors an entry trains on all of them, and is
/// encoded whole).
pub fn encodes_by_rows(stages: &[StageSpec], shape: &[usize]) -> bool {
    if !codes_rows_independently(stages) {
        return false;
    }
    let cols = shape.last().copied().unwrap_or(1).max(1);
    let rows = shape.iter().product::<usize>() / cols;
    let mut width = cols;
    stages.iter().all(|s| match s {
        StageSpec::Sparse(sp) => {
            width = crate::sparse::rest_cols(sp, width);
            true
        }
        StageSpec::Vq(v) => vq::entries_and_sampled(v, rows * width).1,
        _ => true,
    })
}

/// How many times [`encode_by_rows`] reads each piece's source (and runs
/// the stages before the quantizer on it) before the pass that codes it:
/// two for `uniform` (sample, tally), one for `ternary` without a group
/// (its scale), for `nonuniform` with learned levels (their sample), for
/// `vq` (its codebooks' samples) and for `seedlm` (its largest block),
/// none otherwise.
pub fn fitting_passes(stages: &[StageSpec]) -> usize {
    stages
        .iter()
        .map(|s| match s {
            StageSpec::Uniform(_) => 2,
            StageSpec::Ternary(t) if t.group.is_none() => 1,
            StageSpec::Nonuniform(n) if n.levels == LevelSource::Learned => 1,
            StageSpec::Vq(_) | StageSpec::Seedlm(_) => 1,
            _ => 0,
        })
        .sum()
}

/// Parameters fitted on a whole tensor, over its pieces of rows, that every
/// piece is then coded with.
#[derive(Debug, Clone)]
pub(crate) enum Fitted {
    /// `uniform`'s step and offsets.
    Uniform(UniformMeta),
    /// `ternary`'s one scale (on its f16 grid), without a group.
    Ternary { gamma: f32 },
    /// `nonuniform`'s learned levels (on their f16 grid).
    Levels(Vec<f32>),
    /// `vq`'s codebooks.
    Vq(vq::VqFit),
    /// The top of `seedlm`'s exponent range, from the largest block.
    SeedlmTop(i32),
}

/// The names of the parts a stage writes once for the whole tensor rather
/// than a share per row: each piece carries them whole.
fn tensor_wide_parts(stages: &[StageSpec]) -> Vec<String> {
    stages
        .iter()
        .flat_map(|s| match s {
            StageSpec::Ternary(t) if t.group.is_none() => {
                vec![format!("{}.scales", s.kind())]
            }
            StageSpec::Nonuniform(n) if n.levels == LevelSource::Learned => {
                vec![format!("{}.levels", s.kind())]
            }
            StageSpec::Vq(v) if v.residual => {
                vec![
                    format!("{}.codebook", s.kind()),
                    format!("{}.codebook2", s.kind()),
                ]
            }
            StageSpec::Vq(_) => vec![format!("{}.codebook", s.kind())],
            _ => vec![],
        })
        .collect()
}

/// Rows per piece for rows of `cols` values and at most `max_values`
/// values a piece: a positive multiple of [`ROW_MULTIPLE`].
pub fn piece_rows(cols: usize, max_values: usize) -> usize {
    let rows = max_values / cols.max(1);
    (rows / ROW_MULTIPLE).max(1) * ROW_MULTIPLE
}

/// A tensor encoded by [`encode_by_rows`].
#[derive(Debug, Clone)]
pub struct RowEncoded {
    /// Steps, parts, SQNR and seconds as [`crate::encode_tensor`] gives them
    /// for the whole tensor; `decoded` is empty (no piece is kept).
    pub tensor: EncodedTensor,
    /// Σ x² over the tensor (the sum of the pieces' sums).
    pub energy: f64,
}

/// Encodes a tensor of `shape` through `stages` (which must pass
/// [`codes_rows_independently`]) `rows_per_piece` rows at a time (a
/// multiple of [`ROW_MULTIPLE`]); `piece(r0..r1)` gives rows `r0..r1` as
/// f32 values. `name`, `job_seed` and `elem_bytes` are as for
/// [`crate::encode_tensor`].
pub fn encode_by_rows(
    name: &str,
    shape: &[usize],
    stages: &[StageSpec],
    job_seed: u64,
    elem_bytes: usize,
    rows_per_piece: usize,
    mut piece: impl FnMut(std::ops::Range<usize>) -> Result<Vec<f32>, KernelError>,
) -> Result<RowEncoded, KernelError> {
    let cols = shape.last().copied().unwrap_or(1).max(1);
    let n: usize = shape.iter().product();
    let rows = n / cols;
    let not_split = |why: String| KernelError::Meta {
        stage: "chain".into(),
        why: format!("cannot encode `{name}` by rows: {why}"),
    };
    if !codes_rows_independently(stages) {
        return Err(not_split(
            "its chain does not code rows independently".into(),
        ));
    }
    if !encodes_by_rows(stages, shape) {
        return Err(not_split(
            "its codebook trains on every one of its vectors, not on a sample".into(),
        ));
    }
    if rows_per_piece == 0 || !rows_per_piece.is_multiple_of(ROW_MULTIPLE) {
        return Err(not_split(format!(
            "{rows_per_piece} rows a piece is not a positive multiple of {ROW_MULTIPLE}"
        )));
    }
    if rows == 0 {
        return Err(not_split("it has no values".into()));
    }
    let split = stages
        .iter()
        .position(|s| s.category() == StageCategory::Entropy)
        .unwrap_or(stages.len());
    let (head, tail) = stages.split_at(split);
    let quantizer = head
        .iter()
        .position(|s| s.category() == StageCategory::Quantizer)
        .unwrap_or(0);
    let fitting = Fitting {
        name,
        before: &head[..quantizer],
        job_seed,
        rows,
        cols,
        qcols: head[..quantizer].iter().fold(cols, |c, s| match s {
            StageSpec::Sparse(sp) => crate::sparse::rest_cols(sp, c),
            _ => c,
        }),
        rows_per_piece,
    };
    let fit = match head.get(quantizer) {
        Some(StageSpec::Uniform(spec)) => Some(Fitted::Uniform(fitting.uniform(spec, &mut piece)?)),
        Some(StageSpec::Ternary(t)) if t.group.is_none() => Some(fitting.ternary(&mut piece)?),
        Some(StageSpec::Nonuniform(nu)) if nu.levels == LevelSource::Learned => {
            Some(fitting.levels(nu, &mut piece)?)
        }
        Some(StageSpec::Vq(v)) => Some(fitting.vq(v, &mut piece)?),
        Some(StageSpec::Seedlm(sl)) => Some(fitting.seedlm(sl, &mut piece)?),
        _ => None,
    };
    let shared = tensor_wide_parts(head);
    let mut pieces = 0u64;
    let mut steps: Vec<StepRecord> = Vec::new();
    let mut parts: Vec<Part> = Vec::new();
    let mut seconds = vec![0f64; stages.len()];
    // Each head stage's squared error, and the final one, summed over pieces.
    let mut errors = vec![0f64; head.len()];
    let (mut total, mut final_error) = (0f64, 0f64);
    let mut r0 = 0;
    while r0 < rows {
        let r1 = (r0 + rows_per_piece).min(rows);
        let values = piece(r0..r1)?;
        if values.len() != (r1 - r0) * cols {
            return Err(not_split(format!(
                "rows {r0}..{r1} came as {} values, not {}",
                values.len(),
                (r1 - r0) * cols
            )));
        }
        let piece_energy = energy(&values);
        let original = values.clone();
        let mut e = encode_tensor_with(
            name,
            values,
            &[r1 - r0, cols],
            head,
            job_seed,
            elem_bytes,
            None,
            fit.as_ref(),
        )?;
        pieces += 1;
        // A piece coded with the tensor's one scale records itself as
        // one group; the tensor is one group of all its values.
        for (s, spec) in e.steps.iter_mut().zip(head) {
            if matches!(spec, StageSpec::Ternary(t) if t.group.is_none()) {
                s.meta["codec"]["group"] = json!(rows * fitting.qcols);
            }
        }
        final_error += squared_error(&original, &e.decoded);
        drop(original);
        total += piece_energy;
        for (k, s) in e.steps.iter().enumerate() {
            errors[k] += s.error_added * piece_energy;
            seconds[k] += e.seconds[k];
        }
        if steps.is_empty() {
            steps = e.steps;
            parts = e.parts;
        } else {
            for (a, b) in steps.iter_mut().zip(&e.steps) {
                if a.meta["codec"] != b.meta["codec"] {
                    return Err(not_split(format!(
                        "stage `{}` coded rows {r0}..{r1} with other parameters",
                        a.spec.kind()
                    )));
                }
                a.bytes_in += b.bytes_in;
                a.bytes_out += b.bytes_out;
            }
            join_parts(&mut parts, e.parts, &shared).map_err(not_split)?;
        }
        r0 = r1;
    }
    for s in &mut steps {
        s.meta["rows"] = json!(rows);
    }
    // A tensor-wide part was counted in every piece's sizes; the whole
    // tensor has it once.
    let once: u64 = parts
        .iter()
        .filter(|p| shared.contains(&p.name))
        .map(|p| p.len() as u64)
        .sum();
    let extra = once * (pieces - 1);
    for (k, s) in steps.iter_mut().enumerate().skip(quantizer) {
        s.bytes_out -= extra;
        if k > quantizer {
            s.bytes_in -= extra;
        }
    }
    // The records as the chain keeps them: running SQNR after each head
    // stage, then the quantizer's share fixed up from the final error.
    let mut cumulative = 0f64;
    for (s, e) in steps.iter_mut().zip(&errors) {
        cumulative += e;
        s.error_added = if total > 0.0 { e / total } else { 0.0 };
        s.sqnr_db = sqnr_from(total, cumulative);
    }
    let sqnr = sqnr_from(total, final_error);
    let joined = parts.clone();
    for (k, stage) in tail.iter().enumerate() {
        let t0 = Instant::now();
        let bytes_in = bytes_of(&parts);
        let codec = match stage {
            StageSpec::Zstd(z) => entropy::encode(z.level, &mut parts)?,
            StageSpec::Rans(_) => entropy::encode_rans(&mut parts)?,
            other => return Err(not_split(format!("`{}` after a quantizer", other.kind()))),
        };
        steps.push(StepRecord {
            spec: stage.clone(),
            meta: json!({ "rows": 0, "cols": 0, "codec": codec }),
            bytes_in,
            bytes_out: bytes_of(&parts),
            error_added: 0.0,
            sqnr_db: None,
        });
        seconds[split + k] = t0.elapsed().as_secs_f64();
    }
    // The entropy stages decode back to the joined parts.
    let mut back = parts.clone();
    for s in steps[split..].iter().rev() {
        match s.spec {
            StageSpec::Zstd(_) => entropy::decode(&s.meta["codec"], &mut back)?,
            StageSpec::Rans(_) => entropy::decode_rans(&s.meta["codec"], &mut back)?,
            _ => {}
        }
    }
    if back != joined {
        return Err(KernelError::Meta {
            stage: tail.first().map_or("chain", |s| s.kind()).into(),
            why: format!("`{name}`: the coded parts do not decode to what was coded"),
        });
    }
    settle_quantizer_share(&mut steps, total, final_error);
    Ok(RowEncoded {
        tensor: EncodedTensor {
            steps,
            parts,
            sqnr_db: sqnr,
            seconds,
            output_sqnr_db: None,
            decoded: Vec::new(),
        },
        energy: total,
    })
}

/// What fitting a tensor-wide parameter over the pieces of a tensor needs:
/// the stages before the quantizer (Hadamard rotations and sparse masks,
/// redone on every pass) and how the tensor is cut.
struct Fitting<'a> {
    name: &'a str,
    before: &'a [StageSpec],
    job_seed: u64,
    rows: usize,
    /// Values in a row of the source.
    cols: usize,
    /// Values in a row as the quantizer sees it (the kept values of a row
    /// after a sparse stage).
    qcols: usize,
    rows_per_piece: usize,
}

impl Fitting<'_> {
    /// Rows `r0..r1` as the quantizer sees them: read by `piece` and
    /// through the stages before it, as [`encode_tensor_with`] runs them.
    fn rotated(
        &self,
        r0: usize,
        r1: usize,
        piece: &mut impl FnMut(std::ops::Range<usize>) -> Result<Vec<f32>, KernelError>,
    ) -> Result<crate::Signal, KernelError> {
        let mut x = crate::Signal::from_shape(piece(r0..r1)?, &[r1 - r0, self.cols]);
        if x.data.len() != (r1 - r0) * self.cols {
            return Err(KernelError::Meta {
                stage: "chain".into(),
                why: format!(
                    "cannot encode `{}` by rows: rows {r0}..{r1} came as {} values, not {}",
                    self.name,
                    x.data.len(),
                    (r1 - r0) * self.cols
                ),
            });
        }
        for s in self.before {
            let seed = crate::rng::seed_for(self.job_seed, self.name, s.kind());
            match s {
                StageSpec::Hadamard(h) => {
                    crate::hadamard::forward(&mut x, h.block, seed)?;
                }
                StageSpec::Sparse(sp) => {
                    x = crate::sparse::encode(sp, &x, seed)?.rest.ok_or_else(|| {
                        KernelError::Meta {
                            stage: s.kind().into(),
                            why: format!("`{}`: the sparse stage passed no rest on", self.name),
                        }
                    })?;
                }
                _ => {
                    return Err(KernelError::Meta {
                        stage: s.kind().into(),
                        why: format!(
                            "cannot encode `{}` by rows: `{}` before the quantizer",
                            self.name,
                            s.kind()
                        ),
                    });
                }
            }
        }
        if x.cols != self.qcols {
            return Err(KernelError::Meta {
                stage: "chain".into(),
                why: format!(
                    "cannot encode `{}` by rows: rows of {} values reach the quantizer, not {}",
                    self.name, x.cols, self.qcols
                ),
            });
        }
        Ok(x)
    }

    /// Runs `f(r0, values)` on every piece of rows in order, with the
    /// piece's values as the quantizer sees them ([`Self::rotated`]).
    fn each_piece(
        &self,
        piece: &mut impl FnMut(std::ops::Range<usize>) -> Result<Vec<f32>, KernelError>,
        mut f: impl FnMut(usize, &[f32]) -> Result<(), KernelError>,
    ) -> Result<(), KernelError> {
        for r0 in (0..self.rows).step_by(self.rows_per_piece) {
            let r1 = (r0 + self.rows_per_piece).min(self.rows);
            f(r0, &self.rotated(r0, r1, piece)?.data)?;
        }
        Ok(())
    }

    /// `uniform`'s step and offsets for the whole tensor, as
    /// [`uniform::encode`] fits them on it: the step from the whole
    /// tensor's strided sample, gathered piece by piece, then every piece's
    /// codes tallied at that step.
    fn uniform(
        &self,
        spec: &UniformSpec,
        piece: &mut impl FnMut(std::ops::Range<usize>) -> Result<Vec<f32>, KernelError>,
    ) -> Result<UniformMeta, KernelError> {
        let n = self.rows * self.qcols;
        let stride = uniform::sample_stride(n, self.qcols);
        let dz = spec.deadzone as f32;
        let mut sample = Vec::with_capacity(n.div_ceil(stride));
        self.each_piece(piece, |r0, x| {
            crate::rtn::check_finite(x)?;
            // The sample takes the values at multiples of the stride of
            // the whole tensor's flat index.
            let start = r0 * self.qcols;
            let first = start.div_ceil(stride) * stride - start;
            sample.extend(x.iter().skip(first).step_by(stride));
            Ok(())
        })?;
        let (step, _) = uniform::find_step(&sample, spec.bits, dz);
        drop(sample);
        let mut all = ChunkTally::empty();
        let mut codes = Vec::new();
        self.each_piece(piece, |_, x| {
            codes.resize(x.len(), 0u8);
            all.add(uniform::quantize_pass(x, 1.0 / step, dz, &mut codes));
            Ok(())
        })?;
        all.fit(step, n)
    }

    /// `ternary`'s scale without a group, as [`crate::ternary::encode`]
    /// finds it on the whole tensor: the magnitudes summed in the tensor's
    /// order, carried from piece to piece.
    fn ternary(
        &self,
        piece: &mut impl FnMut(std::ops::Range<usize>) -> Result<Vec<f32>, KernelError>,
    ) -> Result<Fitted, KernelError> {
        let n = self.rows * self.qcols;
        let mut sum = 0f64;
        self.each_piece(piece, |_, x| {
            crate::rtn::check_finite(x)?;
            sum = crate::ternary::abs_sum(sum, x);
            Ok(())
        })?;
        Ok(Fitted::Ternary {
            gamma: crate::ternary::scale_of(sum, n),
        })
    }

    /// `nonuniform`'s learned levels, as [`crate::nonuniform::encode`]
    /// learns them on the whole tensor: the strided sample of values
    /// divided by their group's RMS, gathered piece by piece.
    fn levels(
        &self,
        spec: &NonuniformSpec,
        piece: &mut impl FnMut(std::ops::Range<usize>) -> Result<Vec<f32>, KernelError>,
    ) -> Result<Fitted, KernelError> {
        let n = self.rows * self.qcols;
        let group = crate::rtn::group_len(Some(spec.group), self.rows, self.qcols)?;
        let stride = nonuniform::sample_stride(n);
        let mut sample = Vec::with_capacity(n.div_ceil(stride));
        self.each_piece(piece, |r0, x| {
            crate::rtn::check_finite(x)?;
            nonuniform::extend_sample(&mut sample, x, group, r0 * self.qcols, stride);
            Ok(())
        })?;
        let start = nonuniform::lloyd_max_levels(spec.bits);
        Ok(Fitted::Levels(nonuniform::levels_from_sample(
            &sample, &start,
        )))
    }

    /// `vq`'s codebooks, as [`crate::vq::encode`] trains them on the whole
    /// tensor: the vectors its seeded subsamples take (drawn from the
    /// stage's seed before any piece is read) are gathered in one pass,
    /// then k-means runs on them with the draws that follow.
    fn vq(
        &self,
        spec: &VqSpec,
        piece: &mut impl FnMut(std::ops::Range<usize>) -> Result<Vec<f32>, KernelError>,
    ) -> Result<Fitted, KernelError> {
        vq::check_shape(spec, self.rows, self.qcols)?;
        let v = spec.dim;
        let n = self.rows * self.qcols / v;
        let (entries, sampled) = vq::entries_and_sampled(spec, n * v);
        if !sampled {
            return Err(KernelError::Meta {
                stage: "vq".into(),
                why: format!(
                    "cannot fit `{}`'s codebook over pieces: it trains on all {n} vectors",
                    self.name
                ),
            });
        }
        let m = entries * vq::SAMPLE_PER_ENTRY;
        let seed = crate::rng::seed_for(self.job_seed, self.name, "vq");
        let (seed1, seed2) = vq::codebook_seeds(seed);
        let mut rng1 = SplitMix64::new(seed1);
        let mut rng2 = SplitMix64::new(seed2);
        let at1 = vq::sample_positions(n, m, &mut rng1);
        let at2 = if spec.residual {
            vq::sample_positions(n, m, &mut rng2)
        } else {
            Vec::new()
        };
        let (mut sample1, mut sample2) = (Vec::with_capacity(m * v), Vec::new());
        let (mut i1, mut i2) = (0, 0);
        self.each_piece(piece, |r0, x| {
            vq::check_finite_from(x, r0 * self.qcols)?;
            let first = r0 * self.qcols / v;
            let end = first + x.len() / v;
            for (at, i, sample) in [(&at1, &mut i1, &mut sample1), (&at2, &mut i2, &mut sample2)] {
                while let Some(&p) = at.get(*i).filter(|&&p| p < end) {
                    let k = p - first;
                    sample.extend_from_slice(&x[k * v..(k + 1) * v]);
                    *i += 1;
                }
            }
            Ok(())
        })?;
        let codebook = vq::codebook_from_sample(&sample1, v, entries, spec.iterations, &mut rng1);
        let codebook2 = spec.residual.then(|| {
            let rest = vq::residuals(&sample2, v, &codebook);
            vq::codebook_from_sample(&rest, v, entries, spec.iterations, &mut rng2)
        });
        Ok(Fitted::Vq(vq::VqFit {
            entries,
            codebook,
            codebook2,
        }))
    }

    /// The top of `seedlm`'s exponent range, as [`crate::seedlm::encode`]
    /// sets it from the whole tensor's largest block (a maximum, the same
    /// over pieces in any order).
    fn seedlm(
        &self,
        spec: &SeedlmSpec,
        piece: &mut impl FnMut(std::ops::Range<usize>) -> Result<Vec<f32>, KernelError>,
    ) -> Result<Fitted, KernelError> {
        let mut max_sq = 0f64;
        self.each_piece(piece, |r0, x| {
            vq::check_finite_from(x, r0 * self.qcols)?;
            max_sq = max_sq.max(crate::seedlm::max_block_norm_sq(x, spec.block));
            Ok(())
        })?;
        Ok(Fitted::SeedlmTop(crate::seedlm::top_exponent(
            spec, max_sq,
        )?))
    }
}

/// Whether the records `steps` of an encoded tensor describe a chain that
/// codes rows independently (see [`codes_rows_independently`]), so that
/// [`decode_by_rows`] can decode it a piece at a time.
pub fn decodes_by_rows(steps: &[StepRecord]) -> bool {
    let specs: Vec<StageSpec> = steps.iter().map(|s| s.spec.clone()).collect();
    codes_rows_independently(&specs)
}

/// Decodes a tensor whose chain codes rows independently (see
/// [`decodes_by_rows`]) `rows_per_piece` rows at a time (a multiple of
/// [`ROW_MULTIPLE`]), handing each piece's values to `sink(r0..r1, values)`
/// in order: the values [`crate::decode_tensor`] gives, with one piece in
/// memory besides the entropy-decoded parts. A piece whose parts do not
/// have the sizes its rows need is an error from the piece's decoder, not
/// wrong values.
pub fn decode_by_rows(
    steps: &[StepRecord],
    mut parts: Vec<Part>,
    shape: &[usize],
    rows_per_piece: usize,
    mut sink: impl FnMut(std::ops::Range<usize>, Vec<f32>) -> Result<(), KernelError>,
) -> Result<(), KernelError> {
    let bad = |why: String| KernelError::Meta {
        stage: "chain".into(),
        why,
    };
    if !decodes_by_rows(steps) {
        return Err(bad("the chain does not code rows independently".into()));
    }
    if rows_per_piece == 0 || !rows_per_piece.is_multiple_of(ROW_MULTIPLE) {
        return Err(bad(format!(
            "{rows_per_piece} rows a piece is not a positive multiple of {ROW_MULTIPLE}"
        )));
    }
    let numel = crate::chain::check_declared_sizes(steps, shape)?;
    let cols = shape.last().copied().unwrap_or(1).max(1);
    let rows = numel / cols;
    let split = steps
        .iter()
        .position(|s| s.spec.category() == StageCategory::Entropy)
        .unwrap_or(steps.len());
    let (head, tail) = steps.split_at(split);
    let shared = tensor_wide_parts(&head.iter().map(|s| s.spec.clone()).collect::<Vec<_>>());
    for s in tail.iter().rev() {
        match s.spec {
            StageSpec::Zstd(_) => entropy::decode(&s.meta["codec"], &mut parts)?,
            StageSpec::Rans(_) => entropy::decode_rans(&s.meta["codec"], &mut parts)?,
            _ => return Err(bad(format!("`{}` after an entropy coder", s.spec.kind()))),
        }
    }
    for s in head {
        if s.meta.get("rows").and_then(|v| v.as_u64()) != Some(rows as u64) {
            return Err(bad(format!(
                "stage `{}` records {} rows, the shape {shape:?} has {rows}",
                s.spec.kind(),
                s.meta.get("rows").unwrap_or(&json!(null))
            )));
        }
    }
    // Where row r starts in a part of `len` units over `rows` rows. At a
    // multiple of ROW_MULTIPLE rows every row-independent stage's parts
    // hold a whole number of units (bytes of packed codes or trits, group
    // scales, values), and a part whose last byte is partly filled has the
    // floor of the proportion there: so the floor is exact.
    let at = |r: usize, len: usize| -> usize {
        if rows == 0 {
            0
        } else {
            (r as u128 * len as u128 / rows as u128) as usize
        }
    };
    if rows <= rows_per_piece {
        let values = crate::decode_tensor(head, parts, shape)?;
        return sink(0..rows, values);
    }
    let mut r0 = 0;
    while r0 < rows {
        let r1 = (r0 + rows_per_piece).min(rows);
        let piece_steps: Vec<StepRecord> = head
            .iter()
            .map(|s| {
                let mut s = s.clone();
                s.meta["rows"] = json!(r1 - r0);
                if matches!(&s.spec, StageSpec::Ternary(t) if t.group.is_none()) {
                    // The tensor's one scale is the piece's one scale, over
                    // the values of its rows the quantizer saw.
                    let width = s.meta.get("cols").and_then(|c| c.as_u64()).unwrap_or(0);
                    s.meta["codec"]["group"] = json!((r1 - r0) as u64 * width);
                }
                s
            })
            .collect();
        let mut piece_parts = Vec::with_capacity(parts.len());
        for p in &parts {
            if shared.contains(&p.name) {
                piece_parts.push(p.clone());
                continue;
            }
            let end = |r: usize, len: usize| if r == rows { len } else { at(r, len) };
            let (a, b) = (at(r0, p.data.len()), end(r1, p.data.len()));
            let mut shape = p.shape.clone();
            if let Some(f) = shape.first_mut() {
                *f = end(r1, *f) - at(r0, *f);
            }
            piece_parts.push(Part {
                name: p.name.clone(),
                dtype: p.dtype,
                shape,
                data: p.data[a..b].to_vec(),
            });
        }
        let values = crate::decode_tensor(&piece_steps, piece_parts, &[r1 - r0, cols])?;
        sink(r0..r1, values)?;
        r0 = r1;
    }
    Ok(())
}

/// Appends each part of a later piece to the same part of the pieces
/// before it: the bytes, and the count along the first dimension. A part
/// named in `shared` is the tensor's, the same in every piece, and kept
/// once.
fn join_parts(into: &mut [Part], next: Vec<Part>, shared: &[String]) -> Result<(), String> {
    if into.len() != next.len() {
        return Err(format!(
            "a piece has {} parts, the first had {}",
            next.len(),
            into.len()
        ));
    }
    for (a, b) in into.iter_mut().zip(next) {
        if a.name != b.name
            || a.dtype != b.dtype
            || a.shape.len() != b.shape.len()
            || a.shape.get(1..) != b.shape.get(1..)
        {
            return Err(format!(
                "part `{}` {:?} does not continue part `{}` {:?}",
                b.name, b.shape, a.name, a.shape
            ));
        }
        if shared.contains(&a.name) {
            if a.data != b.data {
                return Err(format!(
                    "part `{}` is the tensor's, yet a piece wrote other bytes",
                    a.name
                ));
            }
            continue;
        }
        if let (Some(x), Some(y)) = (a.shape.first_mut(), b.shape.first()) {
            *x += y;
        }
        a.data.extend_from_slice(&b.data);
    }
    Ok(())
}

fn bytes_of(parts: &[Part]) -> u64 {
    parts.iter().map(|p| p.len() as u64).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode_tensor;
    use crate::rng::gaussian_vec;
    use hcx_protocol::stage::*;

    fn chains() -> Vec<Vec<StageSpec>> {
        let rtn = |bits, group, symmetric| {
            StageSpec::Rtn(RtnSpec {
                bits,
                group,
                symmetric,
                search: false,
            })
        };
        vec![
            vec![rtn(4, Some(128), false)],
            vec![rtn(3, Some(64), true), StageSpec::Rans(RansSpec::default())],
            vec![
                StageSpec::Hadamard(HadamardSpec::default()),
                rtn(4, Some(32), false),
                StageSpec::Zstd(ZstdSpec { level: 3 }),
            ],
            vec![rtn(8, None, true)],
            vec![
                StageSpec::Ternary(TernarySpec { group: Some(64) }),
                StageSpec::Rans(RansSpec::default()),
            ],
            vec![StageSpec::Cast(CastSpec {
                dtype: CastDtype::F16,
            })],
            vec![
                StageSpec::Hadamard(HadamardSpec::default()),
                uniform(4.4, 0.0),
                StageSpec::Rans(RansSpec::default()),
            ],
            vec![uniform(2.5, 0.2), StageSpec::Zstd(ZstdSpec { level: 3 })],
            // Codes beyond ±127: a second byte plane in every piece.
            vec![uniform(9.5, 0.0)],
            // One scale for the tensor.
            vec![
                StageSpec::Hadamard(HadamardSpec::default()),
                StageSpec::Ternary(TernarySpec { group: None }),
                StageSpec::Rans(RansSpec::default()),
            ],
            vec![StageSpec::Ternary(TernarySpec { group: None })],
            vec![
                StageSpec::Hadamard(HadamardSpec::default()),
                nonuniform(3, 64, LevelSource::LloydMax),
                StageSpec::Rans(RansSpec::default()),
            ],
            // Levels learned on the whole tensor's sample.
            vec![
                nonuniform(4, 128, LevelSource::Learned),
                StageSpec::Zstd(ZstdSpec { level: 3 }),
            ],
            // Codebooks trained on subsamples: 25,984 vectors of 2 against
            // 16 × 256, and 12,992 of 4 against 32 × 256.
            vec![vq_stage(2, 4, true), StageSpec::Rans(RansSpec::default())],
            vec![
                StageSpec::Hadamard(HadamardSpec::default()),
                vq_stage(4, 5, false),
            ],
            vec![
                StageSpec::Seedlm(SeedlmSpec {
                    block: 8,
                    coefficients: 3,
                    coefficient_bits: 4,
                    exponent_bits: 3,
                    basis: SeedlmBasis::Bits,
                }),
                StageSpec::Rans(RansSpec::default()),
            ],
            // Sparse masks per row; the quantizer sees the kept values.
            vec![
                StageSpec::Hadamard(HadamardSpec::default()),
                sparse(SparsePattern::TwoFour, 0.5),
                uniform(3.0, 0.0),
                StageSpec::Rans(RansSpec::default()),
            ],
            vec![
                sparse(SparsePattern::Unstructured, 0.3),
                StageSpec::Ternary(TernarySpec { group: None }),
            ],
            vec![
                sparse(SparsePattern::Unstructured, 0.5),
                vq_stage(2, 4, false),
                StageSpec::Zstd(ZstdSpec { level: 3 }),
            ],
        ]
    }

    fn sparse(pattern: SparsePattern, density: f64) -> StageSpec {
        StageSpec::Sparse(SparseSpec { pattern, density })
    }

    fn nonuniform(bits: u8, group: usize, levels: LevelSource) -> StageSpec {
        StageSpec::Nonuniform(NonuniformSpec {
            bits,
            group,
            levels,
        })
    }

    fn vq_stage(dim: usize, bits: u8, residual: bool) -> StageSpec {
        StageSpec::Vq(VqSpec {
            dim,
            bits,
            iterations: 4,
            residual,
        })
    }

    fn uniform(bits: f64, deadzone: f64) -> StageSpec {
        StageSpec::Uniform(UniformSpec { bits, deadzone })
    }

    #[test]
    fn uniform_in_pieces_fits_on_the_whole_tensors_sample() {
        // 1,203 rows of 512: 615,936 values, more than the step search's
        // sample, so it takes every third value of the flat tensor, and
        // pieces of 200 or 440 rows start off that stride. Columns and
        // rows of different scales, so the sample and the offsets matter.
        let (rows, cols) = (1203, 512);
        let mut x = gaussian_vec(21, rows * cols);
        for (i, v) in x.iter_mut().enumerate() {
            *v *= (0.25 + (i % cols) as f32 / 128.0) * (1.0 + (i / cols % 5) as f32);
        }
        assert_eq!(crate::uniform::sample_stride(rows * cols, cols), 3);
        for stages in [
            vec![
                StageSpec::Hadamard(HadamardSpec::default()),
                uniform(4.4, 0.0),
                StageSpec::Rans(RansSpec::default()),
            ],
            vec![uniform(3.0, 0.1)],
        ] {
            let whole = encode_tensor("u", x.clone(), &[rows, cols], &stages, 9, 4).unwrap();
            for per in [200, 440] {
                let mut reads = 0;
                let got = encode_by_rows("u", &[rows, cols], &stages, 9, 4, per, |r| {
                    reads += 1;
                    Ok(x[r.start * cols..r.end * cols].to_vec())
                })
                .unwrap();
                assert_eq!(
                    got.tensor.parts, whole.parts,
                    "{stages:?} in pieces of {per}"
                );
                for (a, b) in got.tensor.steps.iter().zip(&whole.steps) {
                    assert_eq!(a.meta, b.meta, "{stages:?} in pieces of {per}");
                }
                // Sample, tally, code: each piece read three times.
                assert_eq!(reads, 3 * rows.div_ceil(per));
                let mut back = Vec::new();
                decode_by_rows(
                    &got.tensor.steps,
                    got.tensor.parts,
                    &[rows, cols],
                    per,
                    |_, v| {
                        back.extend(v);
                        Ok(())
                    },
                )
                .unwrap();
                assert_eq!(back, whole.decoded);
            }
        }
        // A value that is not finite fails in the fitting passes, as the
        // whole encode fails.
        let mut bad = x.clone();
        bad[700 * cols + 3] = f32::NAN;
        let stages = [uniform(4.0, 0.0)];
        assert!(encode_tensor("u", bad.clone(), &[rows, cols], &stages, 9, 4).is_err());
        let r = encode_by_rows("u", &[rows, cols], &stages, 9, 4, 200, |r| {
            Ok(bad[r.start * cols..r.end * cols].to_vec())
        });
        assert!(r.is_err());
    }

    #[test]
    fn ternary_in_pieces_sums_the_whole_tensors_magnitudes() {
        // 1,003 rows of 320 with rows and columns of different scales:
        // the one scale is the mean magnitude of all 320,960 values, added
        // in the tensor's order across pieces of 120 and 400 rows.
        let (rows, cols) = (1003, 320);
        let mut x = gaussian_vec(31, rows * cols);
        for (i, v) in x.iter_mut().enumerate() {
            *v *= (0.5 + (i % cols) as f32 / 64.0) * (1.0 + (i / cols % 9) as f32);
        }
        for stages in [
            vec![
                StageSpec::Hadamard(HadamardSpec::default()),
                StageSpec::Ternary(TernarySpec { group: None }),
                StageSpec::Zstd(ZstdSpec { level: 3 }),
            ],
            vec![StageSpec::Ternary(TernarySpec { group: None })],
        ] {
            let whole = encode_tensor("t", x.clone(), &[rows, cols], &stages, 4, 2).unwrap();
            for per in [120, 400] {
                let mut reads = 0;
                let got = encode_by_rows("t", &[rows, cols], &stages, 4, 2, per, |r| {
                    reads += 1;
                    Ok(x[r.start * cols..r.end * cols].to_vec())
                })
                .unwrap();
                let t = &got.tensor;
                assert_eq!(t.parts, whole.parts, "{stages:?} in pieces of {per}");
                for (a, b) in t.steps.iter().zip(&whole.steps) {
                    assert_eq!(a.meta, b.meta, "{stages:?} in pieces of {per}");
                    assert_eq!((a.bytes_in, a.bytes_out), (b.bytes_in, b.bytes_out));
                }
                // Scale, code: each piece read twice.
                assert_eq!(reads, 2 * rows.div_ceil(per));
                let mut back = Vec::new();
                decode_by_rows(&t.steps, t.parts.clone(), &[rows, cols], per, |_, v| {
                    back.extend(v);
                    Ok(())
                })
                .unwrap();
                assert_eq!(back, whole.decoded, "{stages:?} in pieces of {per}");
            }
        }
        assert_eq!(
            fitting_passes(&[StageSpec::Ternary(TernarySpec { group: None })]),
            1
        );
        // A value that is not finite fails while the scale is fitted.
        let mut bad = x.clone();
        bad[900 * cols + 7] = f32::INFINITY;
        let stages = [StageSpec::Ternary(TernarySpec { group: None })];
        assert!(encode_tensor("t", bad.clone(), &[rows, cols], &stages, 4, 2).is_err());
        let mut reads = 0;
        let r = encode_by_rows("t", &[rows, cols], &stages, 4, 2, 120, |r| {
            reads += 1;
            Ok(bad[r.start * cols..r.end * cols].to_vec())
        });
        assert!(r.is_err());
        assert_eq!(
            reads, 8,
            "refused in the fitting pass, at the piece holding row 900"
        );
    }

    #[test]
    fn learned_levels_in_pieces_take_the_whole_tensors_strided_sample() {
        // 1,600 rows of 2,000: 3.2 M values, so the levels' sample takes
        // every third value of the flat tensor, and pieces of 40 rows
        // (80,000 values) start off that stride.
        let (rows, cols) = (1600, 2000);
        let mut x = gaussian_vec(41, rows * cols);
        for (i, v) in x.iter_mut().enumerate() {
            // Heavy tails in some rows, so the learned levels move.
            if i / cols % 3 == 0 {
                *v = v.powi(3);
            }
        }
        assert_eq!(crate::nonuniform::sample_stride(rows * cols), 3);
        let stages = [nonuniform(3, 50, LevelSource::Learned)];
        let whole = encode_tensor("l", x.clone(), &[rows, cols], &stages, 6, 2).unwrap();
        for per in [40, 1000] {
            let mut reads = 0;
            let got = encode_by_rows("l", &[rows, cols], &stages, 6, 2, per, |r| {
                reads += 1;
                Ok(x[r.start * cols..r.end * cols].to_vec())
            })
            .unwrap();
            assert_eq!(got.tensor.parts, whole.parts, "pieces of {per}");
            assert_eq!(reads, 2 * rows.div_ceil(per));
        }
    }

    #[test]
    fn pieces_give_the_whole_tensors_bytes() {
        // 203 rows: pieces of 40 and 80 rows leave a last piece of 3 and 43.
        let (rows, cols) = (203, 256);
        let mut x = gaussian_vec(11, rows * cols);
        for (i, v) in x.iter_mut().enumerate() {
            // Rows of very different scales, so that a parameter shared
            // across rows would show.
            *v *= 1.0 + (i / cols % 7) as f32;
        }
        for stages in chains() {
            assert!(codes_rows_independently(&stages), "{stages:?}");
            let whole = encode_tensor("w", x.clone(), &[rows, cols], &stages, 5, 2).unwrap();
            for per in [40, 80, 240] {
                let got = encode_by_rows("w", &[rows, cols], &stages, 5, 2, per, |r| {
                    Ok(x[r.start * cols..r.end * cols].to_vec())
                })
                .unwrap();
                let t = &got.tensor;
                assert_eq!(t.parts, whole.parts, "{stages:?} in pieces of {per} rows");
                assert_eq!(t.steps.len(), whole.steps.len());
                for (a, b) in t.steps.iter().zip(&whole.steps) {
                    assert_eq!(a.meta, b.meta, "{stages:?}");
                    assert_eq!((a.bytes_in, a.bytes_out), (b.bytes_in, b.bytes_out));
                    assert!(
                        (a.error_added - b.error_added).abs() <= 1e-9 * b.error_added.max(1e-12)
                    );
                    match (a.sqnr_db, b.sqnr_db) {
                        (Some(p), Some(q)) => assert!((p - q).abs() < 1e-9, "{p} vs {q}"),
                        (p, q) => assert_eq!(p, q),
                    }
                }
                let (a, b) = (t.sqnr_db.unwrap(), whole.sqnr_db.unwrap());
                assert!((a - b).abs() < 1e-9, "{a} vs {b}");
                let e = energy(&x);
                assert!((got.energy - e).abs() <= 1e-9 * e);
                // And the whole tensor's decoder reads them.
                let back = crate::decode_tensor(&t.steps, t.parts.clone(), &[rows, cols]).unwrap();
                assert_eq!(back, whole.decoded);
            }
        }
    }

    #[test]
    fn pieces_decode_to_the_whole_tensors_values() {
        let (rows, cols) = (203, 256);
        let x = gaussian_vec(12, rows * cols);
        for stages in chains() {
            let whole = encode_tensor("w", x.clone(), &[rows, cols], &stages, 5, 2).unwrap();
            assert!(decodes_by_rows(&whole.steps));
            for per in [40, 80, 240] {
                let mut got = Vec::new();
                let mut pieces = 0;
                decode_by_rows(
                    &whole.steps,
                    whole.parts.clone(),
                    &[rows, cols],
                    per,
                    |r, v| {
                        assert_eq!(r.start * cols, got.len());
                        assert_eq!(v.len(), r.len() * cols);
                        got.extend_from_slice(&v);
                        pieces += 1;
                        Ok(())
                    },
                )
                .unwrap();
                assert_eq!(got, whole.decoded, "{stages:?} in pieces of {per} rows");
                assert_eq!(pieces, rows.div_ceil(per), "{stages:?}");
            }
        }
        // Rows of 50 trits end inside a byte (ten to a row of 10 bytes, the
        // last of 41 rows' 2,050 trits in a partly filled byte): the pieces
        // still start on whole bytes.
        let stages = vec![StageSpec::Ternary(TernarySpec { group: Some(50) })];
        let y = gaussian_vec(13, 41 * 50);
        let e = encode_tensor("t", y, &[41, 50], &stages, 1, 4).unwrap();
        let mut got = Vec::new();
        decode_by_rows(&e.steps, e.parts.clone(), &[41, 50], 40, |_, v| {
            got.extend(v);
            Ok(())
        })
        .unwrap();
        assert_eq!(got, e.decoded);
        // Parts cut short fail in the piece that needs the missing bytes.
        let mut short = e.parts.clone();
        short[0].data.pop();
        assert!(decode_by_rows(&e.steps, short, &[41, 50], 40, |_, _| Ok(())).is_err());
        // A chain with a tensor-wide parameter is refused.
        let u = vec![
            StageSpec::Lowrank(LowrankSpec {
                rank: Some(2),
                rank_fraction: None,
                energy: None,
                keep_residual: true,
            }),
            StageSpec::Ternary(TernarySpec { group: Some(64) }),
        ];
        let e = encode_tensor("u", gaussian_vec(14, 80 * 64), &[80, 64], &u, 1, 4).unwrap();
        assert!(!decodes_by_rows(&e.steps));
        assert!(decode_by_rows(&e.steps, e.parts, &[80, 64], 40, |_, _| Ok(())).is_err());
    }

    #[test]
    fn chains_with_a_tensor_wide_parameter_are_encoded_whole() {
        for stages in [
            vec![
                StageSpec::Lowrank(LowrankSpec {
                    rank: Some(2),
                    rank_fraction: None,
                    energy: None,
                    keep_residual: true,
                }),
                StageSpec::Rtn(RtnSpec {
                    bits: 4,
                    group: None,
                    symmetric: true,
                    search: false,
                }),
            ],
            vec![StageSpec::Hadamard(HadamardSpec::default())],
            vec![],
        ] {
            assert!(!codes_rows_independently(&stages), "{stages:?}");
            let r = encode_by_rows("w", &[80, 64], &stages, 1, 4, 40, |_| {
                Ok(vec![0.0; 40 * 64])
            });
            assert!(r.is_err());
        }
        let rtn = [StageSpec::Rtn(RtnSpec {
            bits: 4,
            group: None,
            symmetric: true,
            search: false,
        })];
        // A codebook that trains on every vector (80 × 64 / 2 = 2,560 of
        // them, not above 16 × 256) is fitted on the whole tensor, though
        // the tensor decodes by rows.
        let small_vq = [vq_stage(2, 4, false)];
        assert!(codes_rows_independently(&small_vq));
        assert!(!encodes_by_rows(&small_vq, &[80, 64]));
        assert!(encodes_by_rows(&small_vq, &[129, 64]));
        // 2:4 halves the vectors the codebook sees.
        let two_four = StageSpec::Sparse(SparseSpec {
            pattern: SparsePattern::TwoFour,
            density: 0.5,
        });
        assert!(!encodes_by_rows(
            &[two_four, vq_stage(2, 4, false)],
            &[129, 64]
        ));
        let x = gaussian_vec(15, 80 * 64);
        let r = encode_by_rows("w", &[80, 64], &small_vq, 1, 4, 40, |r| {
            Ok(x[r.start * 64..r.end * 64].to_vec())
        });
        assert!(
            r.as_ref()
                .is_err_and(|e| e.to_string().contains("trains on every one of its vectors")),
            "{:?}",
            r.map(|_| ())
        );
        let whole = encode_tensor("w", x, &[80, 64], &small_vq, 1, 4).unwrap();
        let mut back = Vec::new();
        decode_by_rows(&whole.steps, whole.parts, &[80, 64], 40, |_, v| {
            back.extend(v);
            Ok(())
        })
        .unwrap();
        assert_eq!(back, whole.decoded);
        let empty = encode_by_rows("w", &[0, 64], &rtn, 1, 4, 40, |_| Ok(Vec::new()));
        assert!(empty.is_err(), "an empty tensor has no pieces to encode");
        assert_eq!(piece_rows(4096, 1 << 26), 16_360);
        assert_eq!(piece_rows(1 << 30, 1 << 26), ROW_MULTIPLE);
    }
}
