//! Server reflection answers in both protocol versions: `grpc.reflection.v1`
//! (current grpcurl, Postman, grpcui) and `grpc.reflection.v1alpha` (grpcurl
//! 1.8, which the suite also drives for real in `api_product.rs`).

use credstream_tests::broker::TestBroker;
use tokio_stream::StreamExt;

const OURS: [&str; 3] = [
    "credstream.v1.AdminService",
    "credstream.v1.AgentService",
    "credstream.v1.PublisherService",
];

#[tokio::test]
async fn both_reflection_versions_list_every_service_and_resolve_our_files() {
    use tonic_reflection::pb::v1;
    use tonic_reflection::pb::v1alpha;
    let broker = TestBroker::start().await;

    let mut client = v1::server_reflection_client::ServerReflectionClient::new(broker.channel());
    let requests = tokio_stream::iter([
        v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            )),
        },
        v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                v1::server_reflection_request::MessageRequest::FileContainingSymbol(
                    "credstream.v1.CredentialUpdate".into(),
                ),
            ),
        },
    ]);
    let mut answers = client
        .server_reflection_info(requests)
        .await
        .unwrap()
        .into_inner();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        answers.next().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list")
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for service in OURS.iter().chain(&[
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]) {
        assert!(names.contains(service), "v1 lists {service}: {names:?}");
    }
    let Some(v1::server_reflection_response::MessageResponse::FileDescriptorResponse(files)) =
        answers.next().await.unwrap().unwrap().message_response
    else {
        panic!("expected file descriptors")
    };
    assert!(!files.file_descriptor_proto.is_empty());

    let mut client =
        v1alpha::server_reflection_client::ServerReflectionClient::new(broker.channel());
    let requests = tokio_stream::iter([v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    }]);
    let mut answers = client
        .server_reflection_info(requests)
        .await
        .unwrap()
        .into_inner();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        answers.next().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list")
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for service in OURS {
        assert!(
            names.contains(&service),
            "v1alpha lists {service}: {names:?}"
        );
    }
}
