//! keeper SDK: typed config, service discovery, elections and control commands over the keeper's
//! etcd v3 API (being built).
