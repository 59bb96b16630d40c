## nlme::intervals() for the nlme reference cases orthodont_varident and oxboys_ar1 (REML, and ML as
## an extra), written to RAW_DIR/nlme_intervals.json; write_refs.py copies it to
## tests/reference/nlme_intervals.json (shortest round-trip doubles, indent 1).
##
## Usage (from the repository root):
##   Rscript tests/reference/make_nlme_intervals.R [RAW_DIR]     # default RAW_DIR: /tmp/mixedjax_lme4_raw
##   .venv/bin/python tests/reference/write_refs.py [RAW_DIR]
##
## The fits are the calls of ../shared/reference/{orthodont_varident,oxboys_ar1}_{reml,ml}.json
## (nlme::lme with default lmeControl()), on the bundled copies of Orthodont.csv / Oxboys.csv with R's
## level order (unordered factors).  intervals(fit, which = "all", level = 0.95) gives approximate
## intervals from the asymptotic normality of the (transformed) estimates (apVar); where that fails
## (oxboys_ar1: the AR(1) parameter and the random intercept are nearly unidentified, apVar is not
## positive definite) the error is recorded and the fixed-effect intervals come from which = "fixed".

suppressPackageStartupMessages({
  library(nlme)
  library(jsonlite)
})

args <- commandArgs(trailingOnly = TRUE)
RAW <- if (length(args) >= 1) args[[1]] else "/tmp/mixedjax_lme4_raw"
dir.create(RAW, showWarnings = FALSE, recursive = TRUE)
if (!file.exists("mixedjax/datasets/factor_levels.json")) stop("run from the repository root")
LEVELS <- fromJSON("mixedjax/datasets/factor_levels.json", simplifyVector = FALSE)

read_shared <- function(name) {
  meta <- LEVELS[[name]]
  types <- unlist(meta$column_types)
  cc <- ifelse(types %in% c("factor", "ordered"), "character",
               ifelse(types == "integer", "integer", "numeric"))
  d <- read.csv(file.path("mixedjax/datasets", meta$file), colClasses = unname(cc), na.strings = "")
  for (col in names(meta$factors))
    d[[col]] <- factor(d[[col]], levels = unlist(meta$factors[[col]]$levels))
  d
}

capture <- function(expr) {
  w <- character(0)
  val <- withCallingHandlers(expr, warning = function(c) {
    w <<- c(w, conditionMessage(c)); invokeRestart("muffleWarning") })
  list(value = val, warnings = unique(w))
}

arr <- function(x) I(x)
ci_tab <- function(m) {  # matrix / data.frame with columns lower, est., upper
  m <- as.matrix(m)
  list(parameters = arr(rownames(m)), lower = arr(unname(m[, "lower"])),
       estimate = arr(unname(m[, "est."])), upper = arr(unname(m[, "upper"])))
}

CASES <- list(
  orthodont_varident = list(
    data = "Orthodont",
    call = "nlme::lme(distance ~ age + Sex, data = DAT, random = ~ 1 | Subject, method = METHOD, weights = varIdent(form = ~ 1 | Sex))"),
  oxboys_ar1 = list(
    data = "Oxboys",
    call = "nlme::lme(height ~ age, data = DAT, random = ~ 1 | Subject, method = METHOD, correlation = corAR1(form = ~ 1 | Subject))"))

out <- list()
for (id in names(CASES)) for (method in c("REML", "ML")) {
  cs <- CASES[[id]]
  DAT <- read_shared(cs$data)
  METHOD <- method
  f <- capture(eval(parse(text = cs$call)))
  fit <- f$value
  case_id <- paste0(id, "_", tolower(method))
  res <- list(case_id = case_id,
              call = sub("METHOD", paste0("'", method, "'"), cs$call, fixed = TRUE),
              fit_warnings = arr(f$warnings),
              logLik = as.numeric(logLik(fit)),
              fixed_effects = list(names = arr(names(fixef(fit))), estimate = arr(unname(fixef(fit)))),
              sigma = fit$sigma,
              apVar = if (is.character(fit$apVar)) fit$apVar else "ok (positive definite)")
  iv <- tryCatch(capture(intervals(fit, which = "all", level = 0.95)),
                 error = function(e) list(error = conditionMessage(e)))
  IV <- list(level = 0.95)
  if (!is.null(iv$error)) {
    IV$error <- iv$error
    fx <- capture(intervals(fit, which = "fixed", level = 0.95))
    IV$fixed <- ci_tab(fx$value$fixed)
    IV$warnings <- arr(fx$warnings)
    IV$note <- "intervals(which = 'all') failed (error above); fixed-effect intervals from intervals(which = 'fixed'); reStruct, varStruct / corStruct and sigma are not available"
  } else {
    v <- iv$value
    IV$fixed <- ci_tab(v$fixed)
    IV$reStruct <- lapply(v$reStruct, ci_tab)
    if (!is.null(v$corStruct)) IV$corStruct <- ci_tab(v$corStruct)
    if (!is.null(v$varStruct)) IV$varStruct <- ci_tab(v$varStruct)
    s <- v$sigma
    IV$sigma <- list(lower = unname(s[["lower"]]), estimate = unname(s[["est."]]), upper = unname(s[["upper"]]))
    IV$warnings <- arr(iv$warnings)
    IV$note <- "nlme::intervals(which = 'all'): approximate 95% intervals from the asymptotic normality of the (transformed) estimates; reStruct rows are sd(...) / cor(...), varStruct the varIdent sd ratios, corStruct Phi, sigma the residual sd"
  }
  res$intervals <- IV
  out[[case_id]] <- res
  cat(sprintf("%-26s logLik %.10f intervals %s\n", case_id, res$logLik,
              if (is.null(IV$error)) "ok" else paste("FAILED:", gsub("\n", " ", IV$error))))
}

doc <- list(
  primary_engine = "nlme",  # (refcheck.py, listing tests/reference, skips files whose engine is not lme4)
  software = list(R = R.version.string, nlme = as.character(packageVersion("nlme")),
                  jsonlite = as.character(packageVersion("jsonlite"))),
  note = "nlme::intervals() of the nlme reference fits (primary engine nlme) of ../shared/reference; the REML fits are the ones asked for, the ML fits are extra",
  cases = out)

full_prec <- function(x) {
  if (is.list(x)) { nm <- names(x); x <- lapply(x, full_prec); names(x) <- nm; return(x) }
  if (is.double(x) || is.integer(x)) {
    s <- ifelse(is.finite(x), if (is.double(x)) sprintf("%.17g", x) else as.character(x), "null")
    if (length(x) != 1L || inherits(x, "AsIs")) s <- paste0("[", paste(s, collapse = ", "), "]")
    return(structure(s, class = "json"))
  }
  x
}
file <- file.path(RAW, "nlme_intervals.json")
writeLines(toJSON(full_prec(doc), auto_unbox = TRUE, json_verbatim = TRUE, null = "null", pretty = TRUE), file)
cat("wrote", file, "\n")
