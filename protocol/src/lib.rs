//! Wire and file formats of hcx-cluster: the job spec a user writes
//! ([`JobSpec`], entry point [`JobSpec::load`]), the stage parameters
//! ([`StageSpec`]) and the artifact manifest ([`Manifest`]).
//! No I/O beyond reading a job file, no async.
#![warn(missing_docs, unreachable_pub)]

pub mod job;
pub mod manifest;
pub mod metrics;
pub mod stage;

pub use job::{
    Calibration, CalibrationOrder, CalibrationParallel, Distill, DistillParam, EndToEnd, Files,
    Gates, JobError, JobSpec, Keep, OnMiss, Place, Placement, Rule,
};
pub use manifest::{FileEntry, Manifest, PartEntry, StepRecord, TensorEntry};
pub use stage::{StageCategory, StageSpec};

/// JSON Schema of the job file, for editors.
pub fn job_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(JobSpec)).unwrap_or(serde_json::Value::Null)
}
