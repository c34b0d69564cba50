//! What is checked of a document besides juniper's own validation: the limits, the root fields
//! of a subscription (the "single root field" rule and the metric label), the operation's type
//! and field count, and variables of unknown types. Walks expand fragments once each.

use std::collections::HashMap;

use juniper::DefaultScalarValue;

use crate::Schema;

/// Bounds on documents, checked by juniper's parser before validation and execution (depth of
/// selections with fragments expanded, fields after fragment expansion, aliases included, and
/// tokens).
#[derive(Debug, Clone, Copy)]
pub struct DocumentLimits {
    pub max_depth: usize,
    pub max_fields: usize,
    pub max_tokens: usize,
}

impl Default for DocumentLimits {
    fn default() -> Self {
        // The introspection queries of Playground and GraphiQL nest about 20 levels once their
        // fragments are expanded (TypeRef's chain of `ofType`); queries of this schema need 4.
        // The field limit, not the depth, is what bounds the work of a hostile document.
        Self {
            max_depth: 24,
            max_fields: 500,
            max_tokens: 5_000,
        }
    }
}

/// What the gateway's admission needs of a document, from one parse: the operation's type,
/// a subscription's root fields and a variable of a type the schema does not know. All `None`
/// when the document does not parse within the limits or names no such operation (its
/// execution then reports why).
#[derive(Debug, Default)]
pub struct Inspected {
    pub operation_type: Option<juniper::OperationType>,
    /// A subscription's root fields (`None` for another operation, or a fragment cycle).
    pub root_fields: Option<RootFields>,
    /// The error for a variable of an unknown type ([`unknown_variable_type`]).
    pub unknown_variable_type: Option<String>,
}

/// [`Inspected`] for `query` and the operation `operation_name` names.
pub fn inspect(schema: &Schema, query: &str, operation_name: Option<&str>) -> Inspected {
    let Ok(document) = juniper::parser::parse_document_source(query, &schema.schema) else {
        return Inspected::default();
    };
    let unknown_variable_type = unknown_variable_in(schema, &document);
    let Some(walk) = DocumentWalk::new(&document) else {
        return Inspected {
            unknown_variable_type,
            ..Inspected::default()
        };
    };
    let operation = walk.operation(operation_name);
    let root_fields = operation
        .filter(|operation| operation.operation_type == juniper::OperationType::Subscription)
        .map(|operation| {
            let (count, first) = walk.root_fields(&operation.selection_set, &mut HashMap::new());
            RootFields {
                count,
                first: first.map(str::to_owned),
            }
        });
    Inspected {
        operation_type: operation.map(|operation| operation.operation_type),
        root_fields,
        unknown_variable_type,
    }
}

/// What a subscription's root selects, fragments expanded, as the GraphQL spec's "single root
/// field" rule counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootFields {
    pub count: usize,
    /// The first root field's name (the metric label), if any.
    pub first: Option<String>,
}

/// How many fields an operation selects, fragments expanded and aliases counted, as the
/// document field limit counts them: what a batch's operations add up to. `None` when the
/// document does not parse within the schema's limits, names no such operation or has a
/// fragment cycle (its own execution then reports why).
pub fn operation_field_count(
    schema: &Schema,
    query: &str,
    operation_name: Option<&str>,
) -> Option<usize> {
    let document = juniper::parser::parse_document_source(query, &schema.schema).ok()?;
    let walk = DocumentWalk::new(&document)?;
    let operation = walk.operation(operation_name)?;
    Some(walk.fields(&operation.selection_set, &mut HashMap::new()))
}

/// A variable whose type the schema does not know, if the document has one. juniper's
/// validation panics on such a variable when it has a default value (`query($v: Nope = 1)`,
/// found by the `graphql_limits` fuzz target); checked before validation, it is an error instead.
pub fn unknown_variable_type(schema: &Schema, query: &str) -> Option<String> {
    // A document without `$` has no variables: the common case is spared a second parse.
    if !query.contains('$') {
        return None;
    }
    let document = juniper::parser::parse_document_source(query, &schema.schema).ok()?;
    unknown_variable_in(schema, &document)
}

fn unknown_variable_in(
    schema: &Schema,
    document: &[juniper::Definition<'_, DefaultScalarValue>],
) -> Option<String> {
    document.iter().find_map(|definition| {
        let juniper::Definition::Operation(operation) = definition else {
            return None;
        };
        let variables = operation.item.variables_definition.as_ref()?;
        variables.item.iter().find_map(|(name, definition)| {
            let type_name = definition.var_type.item.innermost_name();
            schema
                .schema
                .concrete_type_by_name(type_name)
                .is_none()
                .then(|| {
                    format!(
                        "Unknown type \"{type_name}\" of variable \"${}\"",
                        name.item
                    )
                })
        })
    })
}

type Selections<'d> = [juniper::Selection<'d, DefaultScalarValue>];

/// A parsed document's operations and fragments, for walks that expand fragment spreads. Each
/// fragment's result is computed once (memoized), so a walk costs the size of the document,
/// not of its expansion; documents with a fragment cycle are not walked at all.
struct DocumentWalk<'d> {
    document: &'d [juniper::Definition<'d, DefaultScalarValue>],
    fragments: HashMap<&'d str, &'d Selections<'d>>,
}

impl<'d> DocumentWalk<'d> {
    fn new(document: &'d [juniper::Definition<'d, DefaultScalarValue>]) -> Option<Self> {
        let fragments = document
            .iter()
            .filter_map(|definition| match definition {
                juniper::Definition::Fragment(fragment) => Some((
                    fragment.item.name.item,
                    fragment.item.selection_set.as_slice(),
                )),
                juniper::Definition::Operation(_) => None,
            })
            .collect();
        let walk = Self {
            document,
            fragments,
        };
        (!walk.has_cycle()).then_some(walk)
    }

    fn operation(
        &self,
        name: Option<&str>,
    ) -> Option<&'d juniper::Operation<'d, DefaultScalarValue>> {
        let mut operations = self
            .document
            .iter()
            .filter_map(|definition| match definition {
                juniper::Definition::Operation(operation) => Some(&operation.item),
                juniper::Definition::Fragment(_) => None,
            });
        match name {
            Some(name) => operations.find(|op| op.name.as_ref().is_some_and(|n| n.item == name)),
            None => {
                let only = operations.next()?;
                operations.next().is_none().then_some(only)
            }
        }
    }

    /// Whether some fragment spreads itself, directly or through others (depth-first search
    /// with three colours over the spread graph).
    fn has_cycle(&self) -> bool {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            Open,
            Done,
        }
        fn spreads<'d>(selections: &'d Selections<'d>, out: &mut Vec<&'d str>) {
            for selection in selections {
                match selection {
                    juniper::Selection::Field(field) => {
                        if let Some(nested) = field.item.selection_set.as_deref() {
                            spreads(nested, out);
                        }
                    }
                    juniper::Selection::InlineFragment(inline) => {
                        spreads(&inline.item.selection_set, out)
                    }
                    juniper::Selection::FragmentSpread(spread) => out.push(spread.item.name.item),
                }
            }
        }
        let mut marks: HashMap<&str, Mark> = HashMap::new();
        for &start in self.fragments.keys() {
            if marks.contains_key(start) {
                continue;
            }
            // An explicit stack: (fragment, its spreads, next index).
            let mut stack: Vec<(&str, Vec<&str>, usize)> = Vec::new();
            let mut targets = Vec::new();
            spreads(self.fragments[start], &mut targets);
            marks.insert(start, Mark::Open);
            stack.push((start, targets, 0));
            while let Some((name, targets, next)) = stack.last_mut() {
                let Some(&target) = targets.get(*next) else {
                    marks.insert(name, Mark::Done);
                    stack.pop();
                    continue;
                };
                *next += 1;
                match marks.get(target) {
                    Some(Mark::Open) => return true,
                    Some(Mark::Done) => {}
                    None => {
                        if let Some(selections) = self.fragments.get(target) {
                            let mut nested = Vec::new();
                            spreads(selections, &mut nested);
                            marks.insert(target, Mark::Open);
                            stack.push((target, nested, 0));
                        }
                    }
                }
            }
        }
        false
    }

    fn fields(&self, selections: &'d Selections<'d>, memo: &mut HashMap<&'d str, usize>) -> usize {
        let mut count = 0usize;
        for selection in selections {
            count = count.saturating_add(match selection {
                juniper::Selection::Field(field) => field
                    .item
                    .selection_set
                    .as_deref()
                    .map_or(0, |nested| self.fields(nested, memo))
                    .saturating_add(1),
                juniper::Selection::InlineFragment(inline) => {
                    self.fields(&inline.item.selection_set, memo)
                }
                juniper::Selection::FragmentSpread(spread) => {
                    let name = spread.item.name.item;
                    match (memo.get(name), self.fragments.get(name)) {
                        (Some(known), _) => *known,
                        (None, Some(selections)) => {
                            let counted = self.fields(selections, memo);
                            memo.insert(name, counted);
                            counted
                        }
                        (None, None) => 0,
                    }
                }
            });
        }
        count
    }

    /// The number of root fields and the first one's name.
    fn root_fields(
        &self,
        selections: &'d Selections<'d>,
        memo: &mut HashMap<&'d str, (usize, Option<&'d str>)>,
    ) -> (usize, Option<&'d str>) {
        let mut count = 0usize;
        let mut first = None;
        for selection in selections {
            let (more, name) = match selection {
                // Aliases name the response key; the rule is about fields, so `a: f, b: f`
                // selects two.
                juniper::Selection::Field(field) => (1, Some(field.item.name.item)),
                juniper::Selection::InlineFragment(inline) => {
                    self.root_fields(&inline.item.selection_set, memo)
                }
                juniper::Selection::FragmentSpread(spread) => {
                    let name = spread.item.name.item;
                    match (memo.get(name), self.fragments.get(name)) {
                        (Some(known), _) => *known,
                        (None, Some(selections)) => {
                            let found = self.root_fields(selections, memo);
                            memo.insert(name, found);
                            found
                        }
                        (None, None) => (0, None),
                    }
                }
            };
            count = count.saturating_add(more);
            first = first.or(name);
        }
        (count, first)
    }
}

/// Whether `name` is a field of the schema's Subscription type: metric labels are taken only
/// from the schema, so clients cannot create label values.
pub fn is_subscription_field(schema: &Schema, name: &str) -> bool {
    schema
        .schema
        .concrete_subscription_type()
        .and_then(|ty| ty.field_by_name(name))
        .is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema;

    #[test]
    fn root_fields_of_a_subscription_are_counted_through_fragments() {
        let schema = schema(DocumentLimits::default());
        let fields = |query: &str| inspect(&schema, query, None).root_fields;
        let count = |query: &str| fields(query).map(|f| f.count);
        assert_eq!(
            fields("subscription { carCreated { id } }"),
            Some(RootFields {
                count: 1,
                first: Some("carCreated".to_owned())
            })
        );
        assert_eq!(
            count("subscription { a: carCreated { id } b: carCreated { id } }"),
            Some(2)
        );
        assert_eq!(
            count(
                "subscription { ...Both } fragment Both on Subscription { carCreated { id } \
                 ... on Subscription { carDeleted { id } } }"
            ),
            Some(2)
        );
        // A cycle is juniper's to report; it is not walked.
        assert_eq!(
            fields("subscription { ...A } fragment A on Subscription { ...A }"),
            None
        );
        assert_eq!(fields("{ hi }"), None, "not a subscription");
        assert_eq!(fields("subscription {"), None, "does not parse");
        assert_eq!(
            inspect(
                &schema,
                "query Q { hi } subscription S { carCreated { id } }",
                Some("S")
            )
            .root_fields
            .and_then(|f| f.first),
            Some("carCreated".to_owned())
        );
        assert!(is_subscription_field(&schema, "carModelUpdated"));
        assert!(!is_subscription_field(&schema, "hi"));
    }

    #[test]
    fn field_counts_expand_fragments_and_count_aliases() {
        let schema = schema(DocumentLimits::default());
        let count = |query: &str| operation_field_count(&schema, query, None);
        assert_eq!(count("{ hi }"), Some(1));
        assert_eq!(count("{ a: hi b: hi }"), Some(2));
        assert_eq!(count("{ cars { id make } }"), Some(3));
        assert_eq!(
            count("{ ...F ...F } fragment F on Query { cars { id } }"),
            Some(4)
        );
        assert_eq!(count("{"), None);
        // Fragments spreading each other in a ring: refused without walking their paths (an
        // unmemoized walk of eleven such fragments took minutes: found by fuzzing).
        let ring: String = (0..11)
            .map(|n| {
                let others: String = (0..11)
                    .filter(|m| *m != n)
                    .map(|m| format!("...F{m} "))
                    .collect();
                format!("fragment F{n} on Query {{ {others} }} ")
            })
            .collect();
        assert_eq!(count(&format!("{{ ...F0 }} {ring}")), None);
        // A diamond (each fragment spreading the next twice) is counted once per fragment.
        assert_eq!(
            count(
                "{ ...A } fragment A on Query { ...B ...B } fragment B on Query { ...C ...C } \
                 fragment C on Query { hi }"
            ),
            Some(4)
        );
    }

    #[test]
    fn unknown_variable_types_are_found_before_validation() {
        let schema = schema(DocumentLimits::default());
        assert!(unknown_variable_type(&schema, "query($i: I = D) { hi }")
            .is_some_and(|message| message.contains("\"I\"")));
        assert_eq!(
            unknown_variable_type(&schema, "query($pk: ID!) { car(pk: $pk) { id } }"),
            None
        );
        assert_eq!(unknown_variable_type(&schema, "{ hi }"), None);
    }
}
