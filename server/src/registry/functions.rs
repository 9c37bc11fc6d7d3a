//! Control.ListFunctions, and the entry of every function list an agent answers
//! (the answers to attaches go on in `attach`).

use std::time::Instant;

use patchbay_proto as pb;
use pb::server_message::Body as ToAgent;

use super::Registry;
use super::model::{AgentId, Caller, Op, OpId, Reply, Request};
use super::validate::validate_pattern;
use crate::error::CoreError;

impl Registry {
    /// Control.ListFunctions: asks the agent; the answer comes as a [`Reply`].
    pub fn list_functions(
        &mut self,
        caller: Caller,
        req: pb::ListFunctionsRequest,
    ) -> Result<OpId, CoreError> {
        let pattern = if req.pattern.is_empty() {
            "*".to_string()
        } else {
            req.pattern
        };
        validate_pattern(&pattern)?;
        let agent = self.agent_by_pid(caller, req.pid)?;
        let op = self.new_op(Op::Functions);
        let rid = self.next_request;
        self.next_request += 1;
        self.requests.insert(
            rid,
            (
                agent,
                Request::Functions {
                    op,
                    limit: req.limit,
                },
            ),
        );
        self.send(
            agent,
            ToAgent::ListFunctions(pb::ListFunctions {
                request_id: rid,
                pattern,
                patchable_only: false,
            }),
        );
        Ok(op)
    }

    /// An agent answered a function listing (of a client or of an attach).
    pub fn function_list(
        &mut self,
        id: AgentId,
        list: pb::FunctionList,
        now: Instant,
    ) -> Result<(), CoreError> {
        match self.requests.get(&list.request_id) {
            None => {
                return Err(CoreError::Protocol(format!(
                    "function list answers unknown request {}",
                    list.request_id
                )));
            }
            Some((agent, _)) if *agent != id => {
                return Err(CoreError::Protocol(format!(
                    "function list answers request {} of another agent",
                    list.request_id
                )));
            }
            Some(_) => {}
        }
        let (_, req) = self
            .requests
            .remove(&list.request_id)
            .expect("checked above");
        let pid = self.agents.get(&id).map(|a| a.hello.pid).unwrap_or(0);
        if let Some(a) = self.agents.get_mut(&id) {
            for f in &list.functions {
                a.site_names.insert(f.address, f.name.clone());
            }
        }
        match req {
            Request::Functions { op, limit } => self.functions_listed(op, limit, pid, list),
            Request::Attach { tracer, op } => {
                let rid = list.request_id;
                self.attach_listed(id, pid, tracer, op, list, now);
                self.listing_answered(id, rid);
            }
        }
        Ok(())
    }

    /// Answers Control.ListFunctions: sorted by name and address, at most `limit`.
    fn functions_listed(&mut self, op: OpId, limit: u32, pid: u32, list: pb::FunctionList) {
        let r = if !list.error.is_empty() {
            Err(CoreError::AgentFailed {
                pid,
                message: list.error,
            })
        } else {
            let total = list.functions.len() as u32;
            let mut functions = list.functions;
            functions.sort_by(|a, b| a.name.cmp(&b.name).then(a.address.cmp(&b.address)));
            if limit > 0 {
                functions.truncate(limit as usize);
            }
            Ok(pb::ListFunctionsResponse { functions, total })
        };
        self.reply(op, Reply::Functions(r));
    }
}
