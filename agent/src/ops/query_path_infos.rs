//! QueryPathInfos: path infos on the agent (for `--from` and build outputs).
//!
//! ```text
//! master → Request::QueryPathInfos(QueryPathInfos { paths, closure })
//! agent  → PathInfosReply::Infos([PathInfo; ≤ MAX_INFOS_PER_FRAME])…  (dependency order)
//!          PathInfosReply::NotValid([StorePath])  (if any requested path is not valid)
//!          PathInfosReply::Done
//! ```

use nixq_common::path_info::topo_sort;
use nixq_common::proto::{write_frame, PathInfosReply, QueryPathInfos, MAX_INFOS_PER_FRAME};

use super::{check_paths, OpError};
use crate::server::{refuse_reply, Ctx};

pub async fn serve(
    ctx: &Ctx,
    query: QueryPathInfos,
    send: &mut quinn::SendStream,
    _recv: quinn::RecvStream,
) -> Result<(), OpError> {
    if let Err(refusal) = check_paths(ctx, &query.paths) {
        refuse_reply(send, &PathInfosReply::Refused(refusal)).await;
        return Ok(());
    }
    let store = &ctx.conn.store;
    let answers = store.path_infos(&query.paths).await?;
    let mut valid = Vec::new();
    let mut not_valid = Vec::new();
    for (path, info) in query.paths.iter().zip(answers) {
        match info {
            Some(info) => valid.push(info),
            None => not_valid.push(path.clone()),
        }
    }
    let ordered = if query.closure {
        let roots: Vec<_> = valid.iter().map(|i| i.path.clone()).collect();
        store.closure(&roots).await?
    } else {
        topo_sort(valid).map_err(|e| OpError::Violation(e.to_string()))?
    };
    for chunk in ordered.chunks(MAX_INFOS_PER_FRAME) {
        write_frame(send, &PathInfosReply::Infos(chunk.to_vec())).await?;
    }
    if !not_valid.is_empty() {
        write_frame(send, &PathInfosReply::NotValid(not_valid)).await?;
    }
    write_frame(send, &PathInfosReply::Done).await?;
    Ok(())
}
