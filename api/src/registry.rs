//! The table of served resources: one row per kind, shared by the API server (routing,
//! discovery) and the clients (`wasmctl get deploy` → deployments.apps).

/// Static facts about one served resource.
#[derive(Debug, PartialEq, Eq)]
pub struct ResourceInfo {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    /// Has a `status` subresource: the main resource ignores status, `/status` ignores the rest.
    pub status_subresource: bool,
    /// `metadata.generation` is bumped when `spec` changes.
    pub generation: bool,
    pub categories: &'static [&'static str],
}

pub static RESOURCES: &[ResourceInfo] = &[
    ResourceInfo {
        group: "",
        version: "v1",
        kind: "Namespace",
        plural: "namespaces",
        singular: "namespace",
        namespaced: false,
        short_names: &["ns"],
        status_subresource: true,
        generation: false,
        categories: &[],
    },
    ResourceInfo {
        group: "",
        version: "v1",
        kind: "Node",
        plural: "nodes",
        singular: "node",
        namespaced: false,
        short_names: &["no"],
        status_subresource: true,
        generation: false,
        categories: &[],
    },
    ResourceInfo {
        group: "",
        version: "v1",
        kind: "Pod",
        plural: "pods",
        singular: "pod",
        namespaced: true,
        short_names: &["po"],
        status_subresource: true,
        generation: true,
        categories: &["all"],
    },
    ResourceInfo {
        group: "",
        version: "v1",
        kind: "Service",
        plural: "services",
        singular: "service",
        namespaced: true,
        short_names: &["svc"],
        status_subresource: true,
        generation: false,
        categories: &["all"],
    },
    ResourceInfo {
        group: "",
        version: "v1",
        kind: "Endpoints",
        plural: "endpoints",
        singular: "endpoints",
        namespaced: true,
        short_names: &["ep"],
        status_subresource: false,
        generation: false,
        categories: &[],
    },
    ResourceInfo {
        group: "",
        version: "v1",
        kind: "Event",
        plural: "events",
        singular: "event",
        namespaced: true,
        short_names: &["ev"],
        status_subresource: false,
        generation: false,
        categories: &[],
    },
    ResourceInfo {
        group: "apps",
        version: "v1",
        kind: "Deployment",
        plural: "deployments",
        singular: "deployment",
        namespaced: true,
        short_names: &["deploy"],
        status_subresource: true,
        generation: true,
        categories: &["all"],
    },
    ResourceInfo {
        group: "apps",
        version: "v1",
        kind: "ReplicaSet",
        plural: "replicasets",
        singular: "replicaset",
        namespaced: true,
        short_names: &["rs"],
        status_subresource: true,
        generation: true,
        categories: &["all"],
    },
    ResourceInfo {
        group: "coordination.k8s.io",
        version: "v1",
        kind: "Lease",
        plural: "leases",
        singular: "lease",
        namespaced: true,
        short_names: &[],
        status_subresource: false,
        generation: false,
        categories: &[],
    },
];

/// The API groups served besides the legacy core group, with their versions.
pub static GROUPS: &[(&str, &str)] = &[("apps", "v1"), ("coordination.k8s.io", "v1")];

impl ResourceInfo {
    /// `v1` or `apps/v1`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `deployment.apps`, `pod`: how kubectl names a kind in messages.
    pub fn qualified_singular(&self) -> String {
        if self.group.is_empty() {
            self.singular.to_string()
        } else {
            format!("{}.{}", self.singular, self.group)
        }
    }

    /// `Deployment.apps`, `Pod`: the group-kind as the API server names it in errors.
    pub fn group_kind(&self) -> String {
        if self.group.is_empty() {
            self.kind.to_string()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }

    /// `deployments.apps`, `pods`: the group-resource.
    pub fn group_resource(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// The URL path of a collection: `/apis/apps/v1/namespaces/ns/deployments`.
    pub fn collection_path(&self, namespace: Option<&str>) -> String {
        let base = if self.group.is_empty() {
            format!("/api/{}", self.version)
        } else {
            format!("/apis/{}/{}", self.group, self.version)
        };
        match (self.namespaced, namespace) {
            (true, Some(ns)) => format!("{base}/namespaces/{ns}/{}", self.plural),
            _ => format!("{base}/{}", self.plural),
        }
    }

    pub fn item_path(&self, namespace: Option<&str>, name: &str) -> String {
        format!("{}/{name}", self.collection_path(namespace))
    }

    /// The store key of one object: `pods/default/web-1`, `nodes/node-1`.
    pub fn key(&self, namespace: &str, name: &str) -> String {
        if self.namespaced {
            format!("{}/{namespace}/{name}", self.store_prefix())
        } else {
            format!("{}/{name}", self.store_prefix())
        }
    }

    /// The store prefix of a collection (all namespaces when `namespace` is `None`).
    pub fn key_prefix(&self, namespace: Option<&str>) -> String {
        match (self.namespaced, namespace) {
            (true, Some(ns)) => format!("{}/{ns}/", self.store_prefix()),
            _ => format!("{}/", self.store_prefix()),
        }
    }

    fn store_prefix(&self) -> String {
        self.group_resource()
    }
}

/// Find a resource by its URL coordinates.
pub fn by_plural(group: &str, version: &str, plural: &str) -> Option<&'static ResourceInfo> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// Find a resource by an object's `apiVersion` and `kind`.
pub fn by_kind(api_version: &str, kind: &str) -> Option<&'static ResourceInfo> {
    RESOURCES
        .iter()
        .find(|r| r.kind == kind && r.api_version() == api_version)
}

/// Resolve what a user typed (`po`, `pods`, `pod`, `Pod`, `deploy`, `deployments.apps`).
pub fn resolve(name: &str) -> Option<&'static ResourceInfo> {
    let lower = name.to_ascii_lowercase();
    let (base, group) = match lower.split_once('.') {
        Some((b, g)) => (b.to_string(), Some(g.to_string())),
        None => (lower.clone(), None),
    };
    RESOURCES.iter().find(|r| {
        let group_ok = group.as_deref().is_none_or(|g| g == r.group);
        group_ok
            && (r.plural == base
                || r.singular == base
                || r.kind.eq_ignore_ascii_case(&base)
                || r.short_names.contains(&base.as_str()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_names() {
        assert_eq!(resolve("deploy").unwrap().kind, "Deployment");
        assert_eq!(resolve("deployments.apps").unwrap().kind, "Deployment");
        assert_eq!(resolve("Pod").unwrap().kind, "Pod");
        assert_eq!(resolve("svc").unwrap().kind, "Service");
        assert_eq!(resolve("ep").unwrap().kind, "Endpoints");
        assert!(resolve("widgets").is_none());
        assert!(resolve("pods.apps").is_none());
    }

    #[test]
    fn keys_and_paths() {
        let d = resolve("deployment").unwrap();
        assert_eq!(d.key("default", "web"), "deployments.apps/default/web");
        assert_eq!(d.key_prefix(None), "deployments.apps/");
        assert_eq!(
            d.item_path(Some("ns"), "web"),
            "/apis/apps/v1/namespaces/ns/deployments/web"
        );
        let n = resolve("nodes").unwrap();
        assert_eq!(n.key("", "n1"), "nodes/n1");
        assert_eq!(n.item_path(Some("x"), "n1"), "/api/v1/nodes/n1");
    }
}
