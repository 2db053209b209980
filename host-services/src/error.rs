//! AWS-shaped errors: the exception name in `x-amzn-ErrorType` and in the
//! body, with the HTTP status Lambda uses for it, so that SDKs raise the
//! same exception classes they raise against AWS.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApiError {
    #[error("{0}")]
    ResourceNotFound(String),
    #[error("{0}")]
    ResourceConflict(String),
    #[error("{0}")]
    InvalidParameterValue(String),
    #[error("{0}")]
    InvalidRequestContent(String),
    #[error("{0}")]
    InvalidZipFile(String),
    #[error("{0}")]
    RequestTooLarge(String),
    #[error("{message}")]
    TooManyRequests {
        message: String,
        reason: &'static str,
    },
    #[error("{0}")]
    ProvisionedConcurrencyConfigNotFound(String),
    /// A SnapStart version whose snapshot is still being made.
    #[error("{0}")]
    SnapStartNotReady(String),
    #[error("{0}")]
    UnrecognizedClient(String),
    #[error("{0}")]
    InvalidSignature(String),
    #[error("{0}")]
    AccessDenied(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// A method and path that name no operation of this API.
    #[error("{0}")]
    UnknownOperation(String),
    /// The worker failed on its side; the message is logged, the caller
    /// gets a generic one.
    #[error("{0}")]
    Service(String),
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str) {
        use ApiError::*;
        match self {
            ResourceNotFound(_) => (StatusCode::NOT_FOUND, "ResourceNotFoundException"),
            ResourceConflict(_) => (StatusCode::CONFLICT, "ResourceConflictException"),
            InvalidParameterValue(_) => (StatusCode::BAD_REQUEST, "InvalidParameterValueException"),
            InvalidRequestContent(_) => (StatusCode::BAD_REQUEST, "InvalidRequestContentException"),
            InvalidZipFile(_) => (StatusCode::BAD_REQUEST, "InvalidZipFileException"),
            RequestTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "RequestTooLargeException"),
            TooManyRequests { .. } => (StatusCode::TOO_MANY_REQUESTS, "TooManyRequestsException"),
            ProvisionedConcurrencyConfigNotFound(_) => (
                StatusCode::NOT_FOUND,
                "ProvisionedConcurrencyConfigNotFoundException",
            ),
            SnapStartNotReady(_) => (StatusCode::CONFLICT, "SnapStartNotReadyException"),
            UnrecognizedClient(_) => (StatusCode::FORBIDDEN, "UnrecognizedClientException"),
            InvalidSignature(_) => (StatusCode::FORBIDDEN, "InvalidSignatureException"),
            AccessDenied(_) => (StatusCode::FORBIDDEN, "AccessDeniedException"),
            UnsupportedMediaType(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaTypeException",
            ),
            UnknownOperation(_) => (StatusCode::NOT_FOUND, "UnknownOperationException"),
            Service(_) => (StatusCode::INTERNAL_SERVER_ERROR, "ServiceException"),
        }
    }

    pub fn not_found(what: impl std::fmt::Display) -> Self {
        ApiError::ResourceNotFound(format!("Function not found: {what}"))
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError::InvalidParameterValue(message.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, name) = self.parts();
        let message = match &self {
            ApiError::Service(detail) => {
                tracing::error!("service error: {detail}");
                "the worker failed to handle the request".to_string()
            }
            other => other.to_string(),
        };
        let mut body = serde_json::json!({ "Type": "User", "message": message });
        if let ApiError::TooManyRequests { reason, .. } = &self {
            body["Reason"] = (*reason).into();
        }
        if matches!(self, ApiError::Service(_)) {
            body["Type"] = "Service".into();
        }
        let mut response = (status, axum::Json(body)).into_response();
        response
            .headers_mut()
            .insert("x-amzn-errortype", HeaderValue::from_static(name));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_exception_name_travels_in_the_header_and_the_status_matches() {
        let response = ApiError::TooManyRequests {
            message: "Rate exceeded".into(),
            reason: "ReservedFunctionConcurrentInvocationLimitExceeded",
        }
        .into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            response.headers()["x-amzn-errortype"],
            "TooManyRequestsException"
        );
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["message"], "Rate exceeded");
        assert_eq!(
            body["Reason"],
            "ReservedFunctionConcurrentInvocationLimitExceeded"
        );
    }

    #[tokio::test]
    async fn service_errors_do_not_leak_their_detail() {
        let response = ApiError::Service("/var/lib/secret: disk full".into()).into_response();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        assert!(!String::from_utf8_lossy(&body).contains("secret"));
    }
}
