//! Compiles the etcd v3 API, the Raft peer service and Longlink's own services with the vendored protoc,
//! so building needs no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");

    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_with_config(
            config,
            &[
                "proto/etcd/mvccpb/kv.proto",
                "proto/etcd/etcdserverpb/rpc.proto",
                "proto/raft.proto",
                "proto/register.proto",
                "proto/room.proto",
                "proto/client.proto",
                "proto/center.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}
