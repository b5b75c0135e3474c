//! kubelet drop-in for the CRI credential mode.
//!
//! In that mode kubelet must send image requests (with their pull secrets) to
//! SOCI's socket instead of containerd's, through a KubeletConfiguration
//! drop-in (`--config-dir`, files ending in `.conf`, merged in name order).

/// The drop-in text: JSON, as kubelet drop-ins on AL2023 are
/// (`/etc/kubernetes/kubelet/config.json.d/`).
pub fn image_service_dropin(soci_address: &str) -> String {
    let v = serde_json::json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "imageServiceEndpoint": format!("unix://{soci_address}"),
    });
    let mut s = serde_json::to_string_pretty(&v).expect("static json");
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropin_points_kubelet_at_soci() {
        let s = image_service_dropin("/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock");
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["kind"], "KubeletConfiguration");
        assert_eq!(
            v["imageServiceEndpoint"],
            "unix:///run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock"
        );
        assert!(s.ends_with("}\n"));
    }
}
