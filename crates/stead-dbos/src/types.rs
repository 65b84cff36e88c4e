//! What the system database says about workflows, as the server returns it.
//!
//! These are wire types too (the server's workflow endpoints return them), so
//! every field that a library version may lack is optional and defaulted:
//! adding a field never breaks an older client.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One workflow, from `workflow_status` (with its input and output, which
/// newer libraries keep in `workflow_input` / `workflow_output`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, ToSchema)]
#[serde(default)]
pub struct WorkflowInfo {
    /// The workflow id (`workflow_uuid`).
    pub id: String,
    /// PENDING, ENQUEUED, SUCCESS, ERROR, CANCELLED, DELAYED or
    /// MAX_RECOVERY_ATTEMPTS_EXCEEDED.
    pub status: String,
    /// The workflow function's name as the library registered it.
    pub name: String,
    pub class_name: Option<String>,
    pub config_name: Option<String>,
    /// The executor (`DBOS__VMID`) that runs or last ran it.
    pub executor_id: Option<String>,
    pub application_version: Option<String>,
    pub application_id: Option<String>,
    /// The queue it waits on or was dequeued from; recovered and resumed
    /// workflows go through `_dbos_internal_queue`.
    pub queue_name: Option<String>,
    /// How many times it has been dispatched; past the library's limit it
    /// becomes MAX_RECOVERY_ATTEMPTS_EXCEEDED.
    pub recovery_attempts: u64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// When its current run was dequeued (NULL for a workflow started
    /// directly rather than through a queue, and after a re-enqueue).
    pub started_at_ms: Option<i64>,
    pub completed_at_ms: Option<i64>,
    /// For a fork, the workflow it was forked from.
    pub forked_from: Option<String>,
    /// For a child workflow, its parent.
    pub parent_workflow_id: Option<String>,
    /// The input, output and error exactly as stored (their encoding is
    /// named by `serialization`: `py_pickle` is base64 of a pickle,
    /// `rust_serde` and `portable_json` are JSON).
    pub input: Option<String>,
    pub output: Option<String>,
    pub error: Option<String>,
    pub serialization: Option<String>,
}

/// One recorded operation (step, child workflow start, sleep, send...) of a
/// workflow, from `operation_outputs`. Only completed operations have a row.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, ToSchema)]
#[serde(default)]
pub struct StepInfo {
    /// Position of the operation in the workflow, from 1.
    pub function_id: u32,
    pub function_name: String,
    /// Output and error exactly as stored (see [`WorkflowInfo::serialization`]).
    pub output: Option<String>,
    pub error: Option<String>,
    /// For an operation that started a child workflow, the child's id.
    pub child_workflow_id: Option<String>,
    pub started_at_ms: Option<i64>,
    pub completed_at_ms: Option<i64>,
    pub serialization: Option<String>,
}

/// Which workflows [`crate::SystemDb::list_workflows`] returns; every field
/// narrows the list, and the newest come first.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, ToSchema)]
#[serde(default)]
pub struct WorkflowFilter {
    pub status: Option<String>,
    pub name: Option<String>,
    pub application_version: Option<String>,
    pub executor_id: Option<String>,
    pub queue_name: Option<String>,
    pub limit: Option<u32>,
    pub offset: Option<u32>,
}
