//! The server's encoder endpoints with the real MiniLM: embeddings (float and base64) equal to
//! the library's, and rerank with a cross-encoder (against transformers' logit) or an
//! embedding model.

use crate::support;

use serde_json::{json, Value};
use support::*;

#[test]
fn embeddings_in_float_and_base64_match_the_library() {
    let (_s, base) = start(options(vec![smollm2(), minilm()]));
    let texts = ["A man is eating food.", "A cheetah chases its prey."];
    let enc = slm::encode::Encoder::load(&minilm()).unwrap();
    let pairs: Vec<(&str, Option<&str>)> = texts.iter().map(|t| (*t, None)).collect();
    let (inputs, _) = enc.prepare(&pairs, enc.max_len, false).unwrap();
    let want = enc.embed(&inputs, 8, enc.pooling).unwrap();
    let url = format!("{base}/v1/embeddings");
    let (status, v) = post(&url, &json!({"model": "all-MiniLM-L6-v2", "input": texts}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "list");
    assert_eq!(
        v["usage"]["prompt_tokens"],
        inputs.iter().map(|i| i.ids.len()).sum::<usize>()
    );
    let (_, b64) = post(
        &url,
        &json!({"model": "all-MiniLM-L6-v2", "input": texts, "encoding_format": "base64"}),
    );
    for (i, w) in want.iter().enumerate() {
        let got: Vec<f32> = v["data"][i]["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(v["data"][i]["index"], i);
        assert_eq!(&got, w);
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64["data"][i]["embedding"].as_str().unwrap())
            .unwrap();
        let decoded: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(&decoded, w);
    }
    // One string is a batch of one.
    let (_, one) = post(
        &url,
        &json!({"model": "all-MiniLM-L6-v2", "input": texts[0]}),
    );
    assert_eq!(one["data"].as_array().unwrap().len(), 1);
    // Two models: the request must name one, and a chat model does not embed.
    let (status, v) = post(&url, &json!({"input": "x"}));
    assert_eq!((status, error_of(&v).1), (400, Some("model")));
    let (status, v) = post(&url, &json!({"model": SMOL, "input": "x"}));
    assert_eq!((status, error_of(&v).1), (400, Some("model")));
    let (status, v) = post(&url, &json!({"model": "nope", "input": "x"}));
    assert_eq!((status, error_of(&v).2), (404, Some("model_not_found")));
    let (status, v) = post(
        &format!("{base}/v1/chat/completions"),
        &json!({"model": "all-MiniLM-L6-v2", "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!((status, error_of(&v).1), (400, Some("model")));
    let (_, models) = get(&format!("{base}/v1/models"));
    let models: Value = serde_json::from_str(&models).unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [SMOL, "all-MiniLM-L6-v2"]);
}

/// A one-label cross-encoder cut from the 3-label BERT fixture: its single logit is the
/// fixture's first logit, which transformers computed (tests/fixtures/encoders/expected.json).
fn cross_encoder() -> support::scratch::Scratch {
    let src = common::fixtures().join("encoders/bert_cls/safetensors");
    let dir = common::tempdir("rerank-cross-encoder");
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, safetensors::Dtype, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        let (mut shape, mut data) = (view.shape().to_vec(), view.data().to_vec());
        if name.starts_with("classifier.") {
            // Row 0 of [3, hidden], or element 0 of the bias.
            let row = data.len() / shape[0];
            data.truncate(row);
            shape[0] = 1;
        }
        tensors.push((name, shape, view.dtype(), data));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, d, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    let cfg_path = dir.join("config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["id2label"] = json!({"0": "LABEL_0"});
    cfg["label2id"] = json!({"LABEL_0": 0});
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    dir
}

#[test]
fn rerank_scores_with_a_cross_encoder_or_an_embedding_model() {
    let ce = cross_encoder();
    let (_s, base) = start(options(vec![
        minilm(),
        ce.to_path_buf(),
        common::fixtures().join("encoders/bert_cls/safetensors"),
        smollm2(),
    ]));
    let url = format!("{base}/v1/rerank");
    // The cross-encoder: transformers' logit for this pair.
    let expected = common::read_json(common::fixtures().join("encoders/expected.json"));
    let want = expected["models"]["bert_cls"]["logits"][2][0]
        .as_f64()
        .unwrap();
    let texts = &expected["texts"][2];
    let (status, v) = post(
        &url,
        &json!({"model": ce.file_name().unwrap().to_str().unwrap(), "query": texts[0], "documents": [texts[1]]}),
    );
    assert_eq!(status, 200, "{v}");
    let got = v["results"][0]["relevance_score"].as_f64().unwrap();
    assert!((got - want).abs() < 1e-4, "{got} vs transformers' {want}");

    // An embedding model: cosine similarity of the embeddings, most relevant first.
    let query = "A man is eating food.";
    let docs = [
        "The new movie is awesome.",
        "A man is eating a piece of bread.",
        "A cheetah chases its prey.",
    ];
    let (status, v) = post(
        &url,
        &json!({"model": "all-MiniLM-L6-v2", "query": query, "documents": docs, "top_n": 2, "return_documents": true}),
    );
    assert_eq!(status, 200, "{v}");
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0]["index"], 1, "{v}");
    assert_eq!(results[0]["document"]["text"], docs[1]);
    let enc = slm::encode::Encoder::load(&minilm()).unwrap();
    let mut texts: Vec<(&str, Option<&str>)> = vec![(query, None)];
    texts.extend(docs.iter().map(|d| (*d, None)));
    let (inputs, _) = enc.prepare(&texts, enc.max_len, false).unwrap();
    let cos = slm::encode::cosine_matrix(&enc.embed(&inputs, 8, enc.pooling).unwrap());
    for r in results {
        let i = r["index"].as_u64().unwrap() as usize;
        let s = r["relevance_score"].as_f64().unwrap() as f32;
        assert!(
            (s - cos[0][i + 1]).abs() < 1e-6,
            "doc {i}: {s} vs {}",
            cos[0][i + 1]
        );
    }
    assert!(results[0]["relevance_score"].as_f64() > results[1]["relevance_score"].as_f64());
    // Documents as objects, as Cohere and Jina send them.
    let (_, v2) = post(
        &url,
        &json!({"model": "all-MiniLM-L6-v2", "query": query, "documents": docs.map(|d| json!({"text": d}))}),
    );
    assert_eq!(v2["results"][0]["index"], 1);

    // What cannot rerank, and what is not a request.
    let (status, v) = post(
        &url,
        &json!({"model": "safetensors", "query": "q", "documents": ["d"]}),
    );
    assert_eq!(
        (status, error_of(&v).1),
        (400, Some("model")),
        "a 3-label classifier: {v}"
    );
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("one label"));
    let (status, v) = post(
        &url,
        &json!({"model": SMOL, "query": "q", "documents": ["d"]}),
    );
    assert_eq!((status, error_of(&v).1), (400, Some("model")));
    let (status, v) = post(
        &url,
        &json!({"model": "all-MiniLM-L6-v2", "query": "q", "documents": []}),
    );
    assert_eq!((status, error_of(&v).1), (400, Some("documents")));
    let (status, v) = post(
        &url,
        &json!({"model": "all-MiniLM-L6-v2", "documents": ["d"]}),
    );
    assert_eq!((status, error_of(&v).1), (400, Some("query")));
    let _ = std::fs::remove_dir_all(&ce);
}
