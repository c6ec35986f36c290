//! `etcdserverpb.Compare` -> [`store::Compare`].

use longlink_proto::etcdserverpb;
use longlink_proto::etcdserverpb::compare::CompareResult as PbResult;
use longlink_proto::etcdserverpb::compare::TargetUnion;

use crate::error::KeeperError;
use crate::limits;
use crate::store::Compare;
use crate::store::CompareResult;
use crate::store::CompareTarget;

impl TryFrom<etcdserverpb::Compare> for Compare {
    type Error = KeeperError;

    fn try_from(c: etcdserverpb::Compare) -> Result<Self, KeeperError> {
        limits::check_key(&c.key)?;
        limits::check_range_end(&c.range_end)?;
        let result = match PbResult::try_from(c.result) {
            Ok(PbResult::Equal) => CompareResult::Equal,
            Ok(PbResult::Greater) => CompareResult::Greater,
            Ok(PbResult::Less) => CompareResult::Less,
            Ok(PbResult::NotEqual) => CompareResult::NotEqual,
            Err(_) => {
                return Err(KeeperError::InvalidArgument(format!(
                    "etcdserver: unknown compare result {}",
                    c.result
                )));
            }
        };
        let target = match c.target_union {
            Some(TargetUnion::Version(v)) => CompareTarget::Version(v),
            Some(TargetUnion::CreateRevision(v)) => CompareTarget::CreateRevision(v),
            Some(TargetUnion::ModRevision(v)) => CompareTarget::ModRevision(v),
            Some(TargetUnion::Value(v)) => CompareTarget::Value(v),
            Some(TargetUnion::Lease(v)) => CompareTarget::Lease(v),
            None => {
                return Err(KeeperError::InvalidArgument(
                    "etcdserver: compare has no target value".into(),
                ));
            }
        };
        Ok(Compare {
            key: c.key,
            range_end: c.range_end,
            target,
            result,
        })
    }
}
