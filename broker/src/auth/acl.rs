//! Access rules: principal (or `*`) × resource (by literal name or prefix) × operation ×
//! allow/deny, and the decision over a set of them. Deny wins; no matching allow denies.

use serde::{Deserialize, Serialize};

/// What a caller does to a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// Write records to a topic.
    Produce,
    /// Read records, or use a group's offsets.
    Consume,
    /// Create a topic.
    Create,
    /// Delete a topic.
    Delete,
    /// See a topic or group.
    Describe,
    /// Change a topic or group (an offset reset).
    Alter,
    /// Everything: security administration, internal services; implies every other
    /// operation on the resources it covers.
    Admin,
}

impl Operation {
    /// Every operation, in wire order.
    pub const ALL: [Operation; 7] = [
        Operation::Produce,
        Operation::Consume,
        Operation::Create,
        Operation::Delete,
        Operation::Describe,
        Operation::Alter,
        Operation::Admin,
    ];

    /// The lowercase name, as the CLI and messages spell it.
    pub fn name(self) -> &'static str {
        match self {
            Operation::Produce => "produce",
            Operation::Consume => "consume",
            Operation::Create => "create",
            Operation::Delete => "delete",
            Operation::Describe => "describe",
            Operation::Alter => "alter",
            Operation::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The kind of resource a rule or a check is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResourceType {
    /// A topic.
    Topic,
    /// A consumer group.
    Group,
    /// A subscription.
    Subscription,
    /// The cluster (named `cluster`).
    Cluster,
}

impl ResourceType {
    /// The lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            ResourceType::Topic => "topic",
            ResourceType::Group => "group",
            ResourceType::Subscription => "subscription",
            ResourceType::Cluster => "cluster",
        }
    }
}

/// A resource a call touches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    /// Its kind.
    pub kind: ResourceType,
    /// Its name.
    pub name: String,
}

impl Resource {
    /// A topic.
    pub fn topic(name: &str) -> Self {
        Resource {
            kind: ResourceType::Topic,
            name: name.to_string(),
        }
    }

    /// A consumer group.
    pub fn group(name: &str) -> Self {
        Resource {
            kind: ResourceType::Group,
            name: name.to_string(),
        }
    }

    /// A subscription.
    pub fn subscription(name: &str) -> Self {
        Resource {
            kind: ResourceType::Subscription,
            name: name.to_string(),
        }
    }

    /// The cluster.
    pub fn cluster() -> Self {
        Resource {
            kind: ResourceType::Cluster,
            name: "cluster".to_string(),
        }
    }
}

impl std::fmt::Display for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {:?}", self.kind.name(), self.name)
    }
}

/// How a rule's name matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pattern {
    /// The name exactly; `*` matches every name.
    Literal,
    /// Every name starting with the rule's name.
    Prefix,
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Permission {
    /// Lets matching calls through unless a deny matches.
    Allow,
    /// Refuses matching calls.
    Deny,
}

/// One access rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AclRule {
    /// The principal, or `*` for every authenticated principal.
    pub principal: String,
    /// The kind of resource.
    pub resource_type: ResourceType,
    /// The name or prefix.
    pub resource_name: String,
    /// How the name matches.
    pub pattern: Pattern,
    /// The operation.
    pub operation: Operation,
    /// Allow or deny.
    pub permission: Permission,
}

impl AclRule {
    /// Whether this rule speaks about `principal` doing `op` on `resource`. An `admin` rule
    /// covers every operation on what it matches.
    pub fn matches(&self, principal: &str, op: Operation, resource: &Resource) -> bool {
        (self.principal == "*" || self.principal == principal)
            && (self.operation == op || self.operation == Operation::Admin)
            && (self.resource_type == resource.kind
                || (self.resource_type == ResourceType::Cluster
                    && self.operation == Operation::Admin))
            && self.matches_name(resource)
    }

    fn matches_name(&self, resource: &Resource) -> bool {
        // A cluster-wide admin rule covers every resource of every kind.
        if self.resource_type == ResourceType::Cluster {
            return true;
        }
        match self.pattern {
            Pattern::Literal => self.resource_name == "*" || self.resource_name == resource.name,
            Pattern::Prefix => resource.name.starts_with(&self.resource_name),
        }
    }

    /// Checks the rule's fields: a principal, a name, and for a prefix a non-empty prefix.
    pub fn validate(&self) -> Result<(), String> {
        if self.principal.is_empty() {
            return Err("an ACL rule needs a principal (or `*`)".into());
        }
        if self.resource_name.is_empty() {
            return Err("an ACL rule needs a resource name (or `*`)".into());
        }
        Ok(())
    }
}

/// The decision over `rules`: allowed when an allow rule matches and no deny rule does.
pub fn decide(rules: &[AclRule], principal: &str, op: Operation, resource: &Resource) -> bool {
    let mut allowed = false;
    for rule in rules.iter().filter(|r| r.matches(principal, op, resource)) {
        match rule.permission {
            Permission::Deny => return false,
            Permission::Allow => allowed = true,
        }
    }
    allowed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(
        principal: &str,
        name: &str,
        pattern: Pattern,
        op: Operation,
        p: Permission,
    ) -> AclRule {
        AclRule {
            principal: principal.into(),
            resource_type: ResourceType::Topic,
            resource_name: name.into(),
            pattern,
            operation: op,
            permission: p,
        }
    }

    #[test]
    fn a_prefix_allows_only_its_names_and_only_its_operation() {
        let rules = [rule(
            "app",
            "orders.",
            Pattern::Prefix,
            Operation::Produce,
            Permission::Allow,
        )];
        let eu = Resource::topic("orders.eu");
        assert!(decide(&rules, "app", Operation::Produce, &eu));
        assert!(!decide(&rules, "app", Operation::Delete, &eu));
        assert!(!decide(
            &rules,
            "app",
            Operation::Produce,
            &Resource::topic("payments")
        ));
        assert!(!decide(&rules, "other", Operation::Produce, &eu));
        assert!(!decide(
            &rules,
            "app",
            Operation::Produce,
            &Resource::group("orders.eu")
        ));
    }

    #[test]
    fn deny_wins_and_nothing_allows_by_default() {
        let t = Resource::topic("t");
        assert!(!decide(&[], "a", Operation::Consume, &t));
        let rules = [
            rule(
                "*",
                "*",
                Pattern::Literal,
                Operation::Consume,
                Permission::Allow,
            ),
            rule(
                "a",
                "t",
                Pattern::Literal,
                Operation::Consume,
                Permission::Deny,
            ),
        ];
        assert!(!decide(&rules, "a", Operation::Consume, &t));
        assert!(decide(&rules, "b", Operation::Consume, &t));
    }

    #[test]
    fn a_cluster_admin_rule_covers_everything() {
        let rules = [AclRule {
            principal: "ops".into(),
            resource_type: ResourceType::Cluster,
            resource_name: "cluster".into(),
            pattern: Pattern::Literal,
            operation: Operation::Admin,
            permission: Permission::Allow,
        }];
        assert!(decide(
            &rules,
            "ops",
            Operation::Delete,
            &Resource::topic("x")
        ));
        assert!(decide(
            &rules,
            "ops",
            Operation::Admin,
            &Resource::cluster()
        ));
        assert!(!decide(
            &rules,
            "dev",
            Operation::Describe,
            &Resource::topic("x")
        ));
    }
}
