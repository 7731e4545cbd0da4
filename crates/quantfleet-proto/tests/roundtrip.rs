//! The generated types carry the proto's shape: oneofs, optional fields and prefixed enum names survive an
//! encode/decode round trip, and the service path is the versioned package's.

use prost::Message;
use quantfleet_proto::v1::{
    FinishReason, GenerateRequest, Prompt, SamplingParams, TokenIds, inference_server::InferenceServer, prompt,
};

#[test]
fn generate_request_round_trips_with_its_oneof_and_optional_seed() {
    let req = GenerateRequest {
        prompt: Some(Prompt { kind: Some(prompt::Kind::Tokens(TokenIds { ids: vec![1, 2, 49151] })) }),
        sampling: Some(SamplingParams { temperature: 0.7, top_p: 0.9, top_k: 40, seed: Some(0) }),
        max_tokens: 16,
        stop: vec!["\n\n".into()],
        top_logprobs: 5,
        ..Default::default()
    };
    let back = GenerateRequest::decode(req.encode_to_vec().as_slice()).unwrap();
    assert_eq!(back, req);
    // An explicit seed of 0 is distinguishable from no seed.
    assert_eq!(back.sampling.unwrap().seed, Some(0));
}

#[test]
fn enum_values_are_prefixed_and_the_service_is_versioned() {
    assert_eq!(FinishReason::StopString.as_str_name(), "FINISH_REASON_STOP_STRING");
    assert_eq!(FinishReason::from_str_name("FINISH_REASON_LENGTH"), Some(FinishReason::Length));
    assert_eq!(<InferenceServer<()> as tonic::server::NamedService>::NAME, quantfleet_proto::INFERENCE_SERVICE_NAME);
}
