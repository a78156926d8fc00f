//! The gRPC status code names, defined once for everything that prints them
//! (the CLI's error lines, metric labels, audit listings).

/// The canonical name of a gRPC status code (`"NOT_FOUND"`,
/// `"INVALID_ARGUMENT"`, ...), as the gRPC specification spells it
/// (<https://grpc.github.io/grpc/core/md_doc_statuscodes.html>).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The name of a numeric status code as carried on the wire or in an audit
/// event (`i32`, 0-16); a number outside the specification's range prints as
/// `CODE_<n>` instead of being folded into `UNKNOWN`.
pub fn numeric_code_name(code: i32) -> String {
    if (0..=16).contains(&code) {
        code_name(tonic::Code::from(code)).to_owned()
    } else {
        format!("CODE_{code}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_specification_and_numbers_round_trip() {
        assert_eq!(code_name(tonic::Code::Ok), "OK");
        assert_eq!(code_name(tonic::Code::NotFound), "NOT_FOUND");
        assert_eq!(code_name(tonic::Code::Unauthenticated), "UNAUTHENTICATED");
        assert_eq!(numeric_code_name(5), "NOT_FOUND");
        assert_eq!(numeric_code_name(16), "UNAUTHENTICATED");
        assert_eq!(numeric_code_name(17), "CODE_17");
        assert_eq!(numeric_code_name(-1), "CODE_-1");
    }
}
