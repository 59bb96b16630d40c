## lme4 reference fits for the cases exam_rs, machines, cake, oxboys_rs, scotssec,
## subjects_items (REML and ML each) and the crossed-inference additions for penicillin_reml.
##
## Usage (from the repository root; see tests/reference/README.md):
##   Rscript tests/reference/make_lme4_refs.R [RAW_DIR]          # default RAW_DIR: /tmp/mixedjax_lme4_raw
##   .venv/bin/python tests/reference/write_refs.py [RAW_DIR]     # -> tests/reference/<case>_<reml|ml>.json
##
## This script writes one raw JSON per case into RAW_DIR (every double written with "%.17g", an exact
## round trip); write_refs.py turns them into the final files (shortest round-trip doubles, indent 1,
## the layout of ../shared/reference/*.json) and merges results.lmerTest / results.predictions into the
## existing tests/reference/penicillin_reml.json.
##
## Reference procedure (as ../shared/reference/README.md describes it):
##   1. lme4::lmer with nloptwrap/BOBYQA and very tight tolerances (xtol_abs 1e-14, ftol_abs 1e-15);
##   2. Newton polish of theta on lme4's own profiled deviance (devFunOnly = TRUE): gradient by
##      central differences (step 1e-5 * max(1, |theta|)), Hessian by second differences
##      (step 1e-4 * max(1, |theta|)); a Newton step is kept only while it lowers max |gradient|.
##      Coordinates of theta that sit on their lower bound 0 (singular fits: theta < 1e-4 after step 1,
##      set to exactly 0 when that does not raise the deviance) stay fixed there; only the others are
##      polished, and the one-sided derivatives at the bound are recorded (>= 0 at a boundary optimum);
##   3. every reported number is lme4's, evaluated at the final theta (lmer with optimizer = NULL and
##      start = the final theta; the object then gets the tight fit's optimizer settings so that
##      profile() / confint() use them, as for the shared reference fits).
## Cross-check: the best of minqa::bobyqa, Nelder_Mead and nloptwrap fits from several starts must not
## beat the reference logLik (estimation$cross_check).

suppressPackageStartupMessages({
  library(lme4)
  library(jsonlite)
})

args <- commandArgs(trailingOnly = TRUE)
RAW <- if (length(args) >= 1) args[[1]] else "/tmp/mixedjax_lme4_raw"
ONLY <- if (length(args) >= 2) strsplit(args[[2]], ",")[[1]] else NULL
dir.create(RAW, showWarnings = FALSE, recursive = TRUE)
if (!file.exists("mixedjax/datasets/factor_levels.json"))
  stop("run from the repository root")
t_script <- Sys.time()
now <- function() as.numeric(Sys.time())

## ---------------------------------------------------------------- data
LEVELS <- fromJSON("mixedjax/datasets/factor_levels.json", simplifyVector = FALSE)

## The shared data sets, read from the bundled copies (byte-identical to ../shared/data/*.csv), with
## R's column types and level orders from factor_levels.json.  Factors are unordered (treatment
## contrasts), as refcheck.py and mixedjax.datasets read them; only grouping factors and unordered
## factors enter the models below, so R's orderedness would change nothing.
read_shared <- function(name) {
  meta <- LEVELS[[name]]
  types <- unlist(meta$column_types)
  cc <- ifelse(types %in% c("factor", "ordered"), "character",
               ifelse(types == "integer", "integer", "numeric"))
  d <- read.csv(file.path("mixedjax/datasets", meta$file), colClasses = unname(cc),
                na.strings = "", check.names = FALSE)
  stopifnot(identical(names(d), names(types)), nrow(d) == meta$rows)
  for (col in names(meta$factors)) {
    lev <- unlist(meta$factors[[col]]$levels)
    stopifnot(all(d[[col]] %in% lev))
    d[[col]] <- factor(d[[col]], levels = lev)
  }
  d
}

## Sanity check against the R packages' own copies (where installed): same values and level order.
check_pkg <- function(d, name, pkg) {
  if (!requireNamespace(pkg, quietly = TRUE)) return(paste(pkg, "not installed: not checked"))
  e <- new.env()
  utils::data(list = name, package = pkg, envir = e)
  p <- as.data.frame(e[[name]])
  ok <- identical(names(p), names(d)) && nrow(p) == nrow(d) &&
    all(vapply(names(d), function(col) {
      if (is.factor(d[[col]])) identical(levels(p[[col]]), levels(d[[col]])) &&
        identical(as.character(p[[col]]), as.character(d[[col]]))
      else isTRUE(all.equal(as.numeric(p[[col]]), as.numeric(d[[col]]), tolerance = 0))
    }, logical(1)))
  if (!ok) stop("data set ", name, " differs from ", pkg, "::", name)
  sprintf("identical to %s::%s (%s %s)", pkg, name, pkg, as.character(packageVersion(pkg)))
}

read_subjects_items <- function() {
  d <- read.csv("tests/data/subjects_items.csv",
                colClasses = c("character", "character", "numeric", "numeric"))
  d$subj <- factor(d$subj, levels = sort(unique(d$subj)))
  d$item <- factor(d$item, levels = sort(unique(d$item)))
  stopifnot(nrow(d) == 1536, nlevels(d$subj) == 48, nlevels(d$item) == 32)
  d
}

## ---------------------------------------------------------------- cases
CASES <- list(
  list(id = "exam_rs", data = "Exam", pkg = "mlmRev", path = "../shared/data/Exam.csv",
       formula = "normexam ~ standLRT + (standLRT | school)",
       structure = "two-level: 4059 students in 65 schools (school); correlated random intercept + slope",
       statsmodels = list(formula = "normexam ~ standLRT", groups = "school", re_formula = "~standLRT",
                          vc_formula = NULL, note = NULL)),
  list(id = "machines", data = "Machines", pkg = "nlme", path = "../shared/data/Machines.csv",
       formula = "score ~ Machine + (1 | Worker) + (1 | Worker:Machine)",
       structure = "nested: Worker:Machine (18) within Worker (6), 3 replicates per cell",
       statsmodels = list(formula = "score ~ Machine", groups = "Worker", re_formula = "1",
                          vc_formula = list(Machine = "0 + C(Machine)"),
                          note = "Worker:Machine as a variance component within each Worker group")),
  list(id = "cake", data = "cake", pkg = "lme4", path = "../shared/data/cake.csv",
       formula = "angle ~ recipe + temp + (1 | recipe:replicate)",
       structure = "split-plot: recipe:replicate (45) whole plots x 6 temperatures; temp numeric",
       derived_columns = list(recipe_replicate = "paste(recipe, replicate, sep = ':')"),
       statsmodels = list(formula = "angle ~ recipe + temp", groups = "recipe_replicate",
                          re_formula = "1", vc_formula = NULL,
                          note = "groups = the derived column recipe_replicate (recipe:replicate)")),
  list(id = "oxboys_rs", data = "Oxboys", pkg = "nlme", path = "../shared/data/Oxboys.csv",
       formula = "height ~ age + (age | Subject)",
       structure = "longitudinal: 26 boys (Subject) x 9 occasions; correlated random intercept + slope",
       statsmodels = list(formula = "height ~ age", groups = "Subject", re_formula = "~age",
                          vc_formula = NULL, note = NULL)),
  list(id = "scotssec", data = "ScotsSec", pkg = "mlmRev", path = "../shared/data/ScotsSec.csv",
       formula = "attain ~ verbal * sex + (1 | primary) + (1 | second)",
       structure = "crossed: primary (148) x second (19), partially crossed, unbalanced",
       statsmodels = list(formula = "attain ~ verbal * sex", groups = "_all", re_formula = "0",
                          vc_formula = list(primary = "0 + C(primary)", second = "0 + C(second)"),
                          note = "crossed factors via ONE group containing all rows (column _all = 1) and a variance component per factor"),
       inference = TRUE, first_term = "~(1 | primary)",
       newdata = data.frame(
         verbal = c(0, 5, -5, 10, 0, 2.5),
         sex = factor(c("M", "F", "F", "M", "F", "M"), levels = c("M", "F")),
         primary = c("1", "2", "1", "P_NEW", "P_NEW", "148"),
         second = c("9", "1", "S_NEW", "9", "S_NEW", "19"),
         stringsAsFactors = FALSE)),
  list(id = "subjects_items", data = NULL, path = "tests/data/subjects_items.csv",
       formula = "y ~ cond + (1 + cond | subj) + (1 + cond | item)",
       structure = "crossed: 48 subjects (subj) x 32 items (item), fully crossed, one obs per cell; correlated random intercept + slope of cond in both factors (singular: item correlation -1)",
       statsmodels = list(not_expressible = "correlated random slopes in two crossed factors: statsmodels variance components cannot be correlated"),
       inference = TRUE, first_term = "~(1 + cond | subj)",
       newdata = data.frame(
         cond = c(-0.5, 0.5, 0.5, -0.5, 0.5, -0.5),
         subj = c("S01", "S48", "S01", "S49", "S49", "S10"),
         item = c("I01", "I32", "I33", "I05", "I33", "I20"),
         stringsAsFactors = FALSE)),
  list(id = "penicillin", data = "Penicillin", pkg = "lme4", path = "../shared/data/Penicillin.csv",
       formula = "diameter ~ 1 + (1 | plate) + (1 | sample)",
       structure = "crossed: plate (24) x sample (6)",
       statsmodels = list(formula = "diameter ~ 1", groups = "_all", re_formula = "0",
                          vc_formula = list(plate = "0 + C(plate)", sample = "0 + C(sample)"),
                          note = "crossed factors via ONE group containing all rows (column _all = 1) and a variance component per factor"),
       inference = TRUE, first_term = "~(1 | plate)", methods = "REML",
       newdata = data.frame(
         plate = c("a", "m", "a", "y", "y"),
         sample = c("A", "F", "G", "A", "G"),
         stringsAsFactors = FALSE))
)

## ---------------------------------------------------------------- helpers
TIGHT_OPT <- list(algorithm = "NLOPT_LN_BOBYQA", xtol_abs = 1e-14, ftol_abs = 1e-15,
                  xtol_rel = 0, ftol_rel = 0, maxeval = 1e6)
TIGHT <- lmerControl(optimizer = "nloptwrap", optCtrl = TIGHT_OPT, calc.derivs = FALSE)
TIGHT_STR <- paste0("lmerControl(optimizer = 'nloptwrap', optCtrl = list(algorithm = 'NLOPT_LN_BOBYQA', ",
                    "xtol_abs = 1e-14, ftol_abs = 1e-15, xtol_rel = 0, ftol_rel = 0, maxeval = 1e6), ",
                    "calc.derivs = FALSE)")
NULLCTRL <- lmerControl(optimizer = NULL, calc.derivs = FALSE)

## run an expression, collecting warnings and messages (both muffled)
capture <- function(expr) {
  w <- character(0); m <- character(0)
  val <- withCallingHandlers(expr,
    warning = function(c) { w <<- c(w, conditionMessage(c)); invokeRestart("muffleWarning") },
    message = function(c) { m <<- c(m, sub("\n$", "", conditionMessage(c))); invokeRestart("muffleMessage") })
  list(value = val, warnings = unique(w), messages = unique(m))
}

## the fitting calls are evaluated in the global environment with data DAT (so that update(),
## lmerTest and pbkrtest, which re-evaluate the call, find everything)
fit_call <- function(formula, reml, control, start = FALSE, devfun = FALSE) {
  cl <- paste0("lme4::lmer(", formula, ", data = DAT, REML = ", reml, ", control = ", control,
               if (start) ", start = list(theta = START)" else "",
               if (devfun) ", devFunOnly = TRUE" else "", ")")
  parse(text = cl)[[1]]
}

arr <- function(x) I(x)  # keep length-1 vectors as JSON arrays
rows <- function(m) lapply(seq_len(nrow(m)), function(i) arr(unname(m[i, ])))
sw <- function() list(R = sub("R version ([0-9.]+).*", "\\1", R.version.string),
                      lme4 = as.character(packageVersion("lme4")))
## lme4 versions are written as R prints them in the shared files: 1.1-31, Matrix 1.5-3
pv <- function(p) {
  v <- as.character(packageVersion(p))
  parts <- strsplit(v, ".", fixed = TRUE)[[1]]
  if (p %in% c("lme4", "Matrix", "nlme", "mlmRev") && length(parts) == 3)
    paste0(parts[1], ".", parts[2], "-", parts[3]) else v
}
BLAS <- tryCatch(extSoftVersion()[["BLAS"]], error = function(e) NA_character_)
LAPACK <- tryCatch(La_library(), error = function(e) NA_character_)

## ---------------------------------------------------------------- Newton polish
newton_polish <- function(devfun, theta0, lower, tnames) {
  t0 <- now()
  f <- function(th) as.numeric(devfun(th))
  n <- length(theta0)
  th <- as.numeric(theta0)
  obj_before <- f(th)
  bnd <- which(lower == 0 & th < 1e-4)
  boundary <- NULL
  if (length(bnd)) {
    th_b <- th; th_b[bnd] <- 0
    if (f(th_b) <= f(th) + 1e-10) th <- th_b
    else bnd <- integer(0)
  }
  free <- setdiff(seq_len(n), bnd)
  hg <- function(th, i) {
    h <- 1e-5 * max(1, abs(th[i]))
    if (lower[i] == 0) h <- min(h, th[i] / 2)
    h
  }
  grad <- function(th) vapply(free, function(i) {
    h <- hg(th, i); e <- numeric(n); e[i] <- h
    (f(th + e) - f(th - e)) / (2 * h)
  }, numeric(1))
  hess <- function(th) {
    k <- length(free)
    hs <- vapply(free, function(i) {
      h <- 1e-4 * max(1, abs(th[i]))
      if (lower[i] == 0) h <- min(h, th[i] / 4)
      h
    }, numeric(1))
    H <- matrix(0, k, k)
    for (a in seq_len(k)) for (b in a:k) {
      ea <- numeric(n); ea[free[a]] <- hs[a]
      eb <- numeric(n); eb[free[b]] <- hs[b]
      H[a, b] <- H[b, a] <- (f(th + ea + eb) - f(th + ea - eb) - f(th - ea + eb) + f(th - ea - eb)) /
        (4 * hs[a] * hs[b])
    }
    H
  }
  g <- grad(th)
  g_before <- max(abs(g))
  iters <- 0L
  stop_reason <- "maximum iterations (10)"
  th_start <- th
  for (it in 1:10) {
    if (max(abs(g)) == 0) { stop_reason <- "zero gradient"; break }
    H <- hess(th)
    R <- tryCatch(chol(H), error = function(e) NULL)
    if (is.null(R)) { stop_reason <- "Hessian not positive definite"; break }
    step <- -backsolve(R, forwardsolve(t(R), g))
    cand <- th
    cand[free] <- cand[free] + step
    if (any(cand < lower)) { stop_reason <- "Newton step would cross a lower bound"; break }
    g_new <- grad(cand)
    if (max(abs(g_new)) >= max(abs(g))) {
      stop_reason <- "gradient no longer decreasing (finite-difference noise level)"
      break
    }
    th <- cand; g <- g_new; iters <- iters + 1L
  }
  if (length(bnd)) {
    bgrad <- vapply(bnd, function(i) {
      h <- 1e-5; e <- numeric(n); e[i] <- h
      (f(th + e) - f(th)) / h
    }, numeric(1))
    boundary <- list(names = arr(tnames[bnd]), values = arr(th[bnd]),
                     one_sided_derivative = arr(bgrad),
                     note = paste("theta coordinates on their lower bound 0 (kept fixed; theta < 1e-4 after the tight fit,",
                                  "set to exactly 0); one-sided forward difference (step 1e-5) of the profiled deviance:",
                                  ">= 0 means the bound is active at the optimum"))
  }
  list(theta = th,
       info = list(applied = TRUE, reason = NULL, iterations = iters, stop_reason = stop_reason,
                   objective_before = obj_before, objective_after = f(th),
                   max_abs_grad_before = g_before, max_abs_grad_after = max(abs(g)),
                   max_abs_theta_change = max(abs(th - theta0)),
                   free_parameters = arr(tnames[free]),
                   boundary = boundary,
                   time_s = now() - t0,
                   note = "objective = lme4 profiled deviance (-2 logLik, REML or ML); gradient by central differences, step 1e-5*max(1,|theta|); Hessian by second differences, step 1e-4*max(1,|theta|); a step is kept only if it lowers max |gradient|"))
}

## ---------------------------------------------------------------- extraction
fixef_block <- function(fit, full = TRUE) {
  cf <- summary(fit)$coefficients
  out <- list(names = arr(rownames(cf)), estimate = arr(unname(cf[, 1])),
              std_error = arr(unname(cf[, 2])))
  if (full) {
    out$t_value <- arr(unname(cf[, 3]))
    out$vcov <- rows(as.matrix(vcov(fit)))
  }
  out
}

re_block <- function(fit, vc_name = TRUE) {
  vc <- VarCorr(fit)
  lapply(names(vc), function(g) {
    m <- vc[[g]]
    cov <- unname(as.matrix(m))
    sds <- unname(attr(m, "stddev"))
    cor <- unname(attr(m, "correlation"))
    if (is.null(cor) || length(cor) == 0) cor <- matrix(1, 1, 1)
    b <- list(group = g, terms = arr(colnames(m)), variances = arr(diag(cov)), std_devs = arr(sds),
              correlation = rows(cor), covariance = rows(cov))
    if (vc_name) b$vc_name <- g
    b
  })
}

theta_block <- function(fit) {
  th <- getME(fit, "theta")
  list(names = arr(names(th)), values = arr(unname(th)),
       note = "lme4 relative covariance factor: lower-triangle (column-major) of Lambda per term, residual sd = 1")
}

condmodes <- function(fit) {
  re <- ranef(fit, condVar = TRUE)
  lapply(names(re), function(g) {
    d <- re[[g]]
    pv <- attr(d, "postVar")
    if (is.null(pv)) pv <- attr(d, "condVar")
    k <- ncol(d)
    list(group = g, n_levels = nrow(d), levels = arr(rownames(d)), terms = arr(colnames(d)),
         conditional_mode = lapply(seq_len(nrow(d)), function(i) arr(unname(as.numeric(d[i, ])))),
         conditional_sd = lapply(seq_len(nrow(d)), function(i)
           arr(sqrt(pmax(diag(matrix(pv[, , i], k, k)), 0)))))
  })
}

confint_wald <- function(fit) {
  ci <- confint(fit, method = "Wald", oldNames = FALSE)
  ci <- ci[stats::complete.cases(ci), , drop = FALSE]
  list(parameters = arr(rownames(ci)), lower = arr(unname(ci[, 1])), upper = arr(unname(ci[, 2])),
       level = 0.95)
}

confint_prof <- function(fit) {
  t0 <- now()
  r <- tryCatch(capture(confint(fit, method = "profile", oldNames = FALSE)),
                error = function(e) list(error = conditionMessage(e)))
  if (!is.null(r$error))
    return(list(error = r$error, time_s = now() - t0,
                note = "lme4 confint(method='profile') failed"))
  ci <- r$value
  out <- list(parameters = arr(rownames(ci)), lower = arr(unname(ci[, 1])), upper = arr(unname(ci[, 2])),
              level = 0.95, time_s = now() - t0)
  if (length(r$warnings)) out$warnings <- arr(r$warnings)
  out$messages <- arr(r$messages)
  out$note <- "lme4 confint(method='profile'); variance parameters on the sd / correlation scale; sigma = residual sd; null = NA (profile did not reach the bound)"
  out
}

## ---------------------------------------------------------------- one case, one method
fit_case <- function(cs, reml) {
  t_case <- now()
  method <- if (reml) "REML" else "ML"
  DAT <<- if (is.null(cs$data)) read_subjects_items() else read_shared(cs$data)
  data_check <- if (!is.null(cs$pkg)) check_pkg(DAT, cs$data, cs$pkg) else "simulated (tests/reference/make_subjects_items.py)"
  fml <- cs$formula

  ## 1. tight BOBYQA
  tcall <- fit_call(fml, reml, "TIGHT")
  t0 <- now(); tf <- capture(eval(tcall, .GlobalEnv)); t_tight <- now() - t0
  tight <- tf$value
  ## 2. Newton polish on lme4's profiled deviance
  devfun <- eval(fit_call(fml, reml, "TIGHT", devfun = TRUE), .GlobalEnv)
  lower <- environment(devfun)$lower
  th_tight <- unname(getME(tight, "theta"))
  pol <- newton_polish(devfun, th_tight, lower, names(getME(tight, "theta")))
  ## 3. lme4 at the final theta
  START <<- pol$theta
  fc <- capture(eval(fit_call(fml, reml, "NULLCTRL", start = TRUE), .GlobalEnv))
  fit <- fc$value
  stopifnot(isTRUE(all.equal(unname(getME(fit, "theta")), pol$theta, tolerance = 0)))
  fit@optinfo$optimizer <- tight@optinfo$optimizer  # profile() uses these
  fit@optinfo$control <- tight@optinfo$control
  ll <- as.numeric(logLik(fit))
  if (ll < as.numeric(logLik(tight)) - 1e-9) stop(cs$id, ": polish lowered logLik")
  ## cross-check: other optimizers / starts
  cc_fits <- list()
  alt <- list(
    minqa_bobyqa = "lmerControl(optimizer = 'bobyqa', optCtrl = list(rhoend = 1e-12, maxfun = 1e6), calc.derivs = FALSE)",
    Nelder_Mead = "lmerControl(optimizer = 'Nelder_Mead', optCtrl = list(FtolAbs = 1e-15, FtolRel = 1e-15, XtolRel = 1e-12, maxfun = 1e6), calc.derivs = FALSE)")
  for (nm in names(alt)) {
    r <- tryCatch(capture(eval(fit_call(fml, reml, alt[[nm]]), .GlobalEnv))$value, error = function(e) NULL)
    if (!is.null(r)) cc_fits[[nm]] <- as.numeric(logLik(r))
  }
  set.seed(1)
  for (k in 1:3) {
    st <- th_tight * runif(length(th_tight), 0.3, 2) + ifelse(lower == 0, 0.05, 0)
    START <<- st
    r <- tryCatch(capture(eval(fit_call(fml, reml, "TIGHT", start = TRUE), .GlobalEnv))$value,
                  error = function(e) NULL)
    if (!is.null(r)) cc_fits[[paste0("nloptwrap_random_start", k)]] <- as.numeric(logLik(r))
  }
  START <<- pol$theta
  cross <- list(logLik = cc_fits, max_gain_over_reference = max(unlist(cc_fits)) - ll,
                note = "logLik of other lme4 fits (minqa bobyqa rhoend 1e-12, Nelder_Mead tight, tight nloptwrap from 3 random starts, seed 1); max_gain_over_reference <= ~1e-9 means none beats the reference")

  ## lme4 with default settings
  dcall <- fit_call(fml, reml, "lmerControl()")
  times <- numeric(5); dfit <- NULL
  for (k in 1:5) { t0 <- now(); d <- capture(eval(dcall, .GlobalEnv)); times[k] <- now() - t0
                   if (k == 1) dfit <- d }
  df <- dfit$value
  total <- sigma(fit)^2 + sum(vapply(VarCorr(fit), function(m) sum(diag(as.matrix(m))), numeric(1)))
  floor_v <- 1e-6 * total
  cov_entries <- function(f) unlist(lapply(VarCorr(f), function(m) { m <- as.matrix(m); m[lower.tri(m, diag = TRUE)] }))
  relv <- function(a, b, fl) max(abs(a - b) / pmax(abs(b), fl))
  vs <- list(logLik_minus_reference = as.numeric(logLik(df)) - ll,
             max_abs_diff_theta = max(abs(getME(df, "theta") - getME(fit, "theta"))),
             max_rel_diff_fixef = relv(fixef(df), fixef(fit), 1e-300),
             max_rel_diff_covariance_entries = relv(cov_entries(df), cov_entries(fit), floor_v),
             rel_diff_residual_variance = abs(sigma(df)^2 - sigma(fit)^2) / sigma(fit)^2)
  lme4_default <- list(
    software = list(engine = "lme4::lmer, default lmerControl()", R = sw()$R, lme4 = pv("lme4"),
                    Matrix = pv("Matrix"), nloptr = pv("nloptr")),
    call = paste0("lme4::lmer(", fml, ", data = DAT, REML = ", reml, ", control = lmerControl())"),
    optimizer = list(name = df@optinfo$optimizer, feval = df@optinfo$feval,
                     return_code = df@optinfo$conv$opt,
                     lme4_messages = arr(as.character(unlist(df@optinfo$conv$lme4$messages))),
                     nlopt_message = df@optinfo$message,
                     gradient = arr(unname(df@optinfo$derivs$gradient))),
    warnings = arr(dfit$warnings), messages = arr(dfit$messages),
    singular = isSingular(df),
    fit_time = list(first_s = times[1], median_s = median(times), n_timed = 5L,
                    note = "wall-clock seconds of the fitting call alone (data already in memory); median over n_timed runs"),
    fixed_effects = fixef_block(df, full = FALSE),
    random_effects = re_block(df, vc_name = FALSE),
    residual_variance = sigma(df)^2,
    theta = arr(unname(getME(df, "theta"))),
    logLik = as.numeric(logLik(df)), AIC = AIC(df), BIC = BIC(df),
    vs_reference = vs)

  ## reference block
  lf <- logLik(fit)
  lme4b <- list(
    software = list(engine = "lme4::lmer", R = sw()$R, lme4 = pv("lme4"), Matrix = pv("Matrix"),
                    nloptr = pv("nloptr"), BLAS = BLAS, LAPACK = LAPACK),
    call = paste0("lme4::lmer(", fml, ", data = DAT, REML = ", reml, ", control = ", TIGHT_STR, ")"),
    warnings = arr(tf$warnings), messages = arr(tf$messages),
    singular = isSingular(fit),
    fit_time = list(tight_fit_s = t_tight, polish_s = pol$info$time_s,
                    note = "cost of producing the reference numbers; lme4 with default settings is timed in lme4_default$fit_time"),
    nobs = nobs(fit),
    ngroups = as.list(ngrps(fit)),
    fixed_effects = fixef_block(fit),
    random_effects = re_block(fit),
    residual_variance = sigma(fit)^2,
    residual_sd = sigma(fit),
    theta = theta_block(fit),
    logLik = ll,
    logLik_df = as.integer(attr(lf, "df")),
    minus2logLik = -2 * ll,
    AIC = AIC(fit), BIC = BIC(fit),
    conditional_modes = condmodes(fit),
    confint_wald = confint_wald(fit),
    confint_profile = confint_prof(fit),
    estimation = list(
      procedure = "reference = lme4 refit with tight BOBYQA tolerances, then Newton polish of theta on lme4's profiled deviance; all results evaluated by lme4 at the final theta",
      tight_fit = list(call = paste0("lme4::lmer(", fml, ", data = DAT, REML = ", reml, ", control = ", TIGHT_STR, ")"),
                       feval = tight@optinfo$feval, return_code = tight@optinfo$conv$opt,
                       nlopt_message = tight@optinfo$message, time_s = t_tight,
                       theta = arr(th_tight), logLik = as.numeric(logLik(tight))),
      polish = pol$info,
      final_evaluation = list(call = paste0("lme4::lmer(", fml, ", data = DAT, REML = ", reml,
                                            ", control = lmerControl(optimizer = NULL, calc.derivs = FALSE), start = list(theta = THETA))"),
                              warnings = arr(fc$warnings), messages = arr(fc$messages)),
      cross_check = cross),
    conditional_modes_note = "ALL levels of every grouping factor, in lme4's ranef() order; conditional_sd = sqrt(diag(condVar))")

  results <- list(lme4 = lme4b, lme4_default = lme4_default)

  ## crossed inference (REML only)
  if (isTRUE(cs$inference) && reml) {
    results$lmerTest <- lmertest_block(fit)
    results$predictions <- predictions_block(fit, cs)
  }

  model <- list(lme4 = fml, lme4_note = NULL, nlme = NULL, glmmTMB = NULL,
                statsmodels = cs$statsmodels,
                derived_columns = cs$derived_columns, data_transform = NULL)
  list(case_id = paste0(cs$id, "_", tolower(method)),
       dataset = basename(cs$path), dataset_path = cs$path, dataset_check = data_check,
       structure = cs$structure, method = method, primary_engine = "lme4",
       model = model, results = results,
       r_wall_time_case_s = now() - t_case,
       comparison = list(lme4_default = list(
         logLik_abs_diff = vs$logLik_minus_reference,
         logLik_rel_diff = abs(vs$logLik_minus_reference) / abs(ll),
         max_rel_diff_fixed_effects = vs$max_rel_diff_fixef,
         rel_diff_residual_variance = vs$rel_diff_residual_variance,
         max_rel_diff_variances = vs$max_rel_diff_covariance_entries,
         variance_rel_diff_floor = floor_v,
         reference_engine = "lme4")))
}

lmertest_block <- function(fit) {
  t0 <- now()
  m <- capture(lmerTest::as_lmerModLmerTest(fit))
  tab <- function(ddf) {
    r <- tryCatch(capture(summary(m$value, ddf = ddf)$coefficients),
                  error = function(e) list(error = conditionMessage(e)))
    if (!is.null(r$error)) return(list(error = r$error))
    cf <- r$value
    out <- list(estimate = arr(unname(cf[, "Estimate"])), std_error = arr(unname(cf[, "Std. Error"])),
                df = arr(unname(cf[, "df"])), t_value = arr(unname(cf[, "t value"])),
                p_value = arr(unname(cf[, "Pr(>|t|)"])))
    if (length(r$warnings)) out$warnings <- arr(r$warnings)
    if (length(r$messages)) out$messages <- arr(r$messages)
    out
  }
  s <- tab("Satterthwaite")
  k <- tab("Kenward-Roger")
  out <- list(software = list(lmerTest = as.character(packageVersion("lmerTest")),
                              pbkrtest = as.character(packageVersion("pbkrtest")),
                              lme4 = as.character(packageVersion("lme4")),
                              R = sw()$R),
              note = "REML reference fit (final theta); coefficient tables of summary(lmerTest::as_lmerModLmerTest(fit), ddf = 'Satterthwaite' / 'Kenward-Roger'); Kenward-Roger also adjusts the standard errors (pbkrtest::vcovAdj)",
              names = arr(names(fixef(fit))),
              satterthwaite = s, kenward_roger = k)
  if (length(m$warnings)) out$warnings <- arr(m$warnings)
  out$time_s <- now() - t0
  out
}

predictions_block <- function(fit, cs) {
  nd <- cs$newdata
  fr <- model.frame(fit)
  seen <- list()
  for (g in names(ngrps(fit))) if (g %in% names(nd))
    seen[[g]] <- arr(nd[[g]] %in% levels(fr[[g]]))
  all_t <- capture(predict(fit, newdata = nd, allow.new.levels = TRUE))
  one_t <- capture(predict(fit, newdata = nd, re.form = as.formula(cs$first_term), allow.new.levels = TRUE))
  fix_t <- capture(predict(fit, newdata = nd, re.form = NA))
  ndj <- lapply(nd, function(x) if (is.factor(x)) arr(as.character(x)) else arr(x))
  list(note = "lme4 predict() on newdata (REML reference fit); levels not in the data get random effect 0 (allow.new.levels = TRUE)",
       newdata = ndj,
       newdata_levels_seen = seen,
       all_terms = list(call = "predict(fit, newdata = ND, allow.new.levels = TRUE)",
                        re_form = NULL, values = arr(unname(all_t$value))),
       first_term = list(call = paste0("predict(fit, newdata = ND, re.form = ", cs$first_term, ", allow.new.levels = TRUE)"),
                         re_form = cs$first_term, values = arr(unname(one_t$value))),
       fixed_only = list(call = "predict(fit, newdata = ND, re.form = NA)",
                         re_form = "NA", values = arr(unname(fix_t$value))),
       warnings = arr(unique(c(all_t$warnings, one_t$warnings, fix_t$warnings))))
}

## ---------------------------------------------------------------- JSON out
## every double verbatim with "%.17g" (exact round trip); NA/NaN/Inf -> null
full_prec <- function(x) {
  if (is.list(x)) {
    nm <- names(x)
    asis <- inherits(x, "AsIs")
    x <- lapply(x, full_prec)
    names(x) <- nm
    return(x)
  }
  if (is.double(x) || is.integer(x)) {
    s <- ifelse(is.finite(x), if (is.double(x)) sprintf("%.17g", x) else as.character(x), "null")
    if (length(x) != 1L || inherits(x, "AsIs")) s <- paste0("[", paste(s, collapse = ", "), "]")
    return(structure(s, class = "json"))
  }
  if (is.logical(x) && length(x) == 1L && is.na(x)) return(structure("null", class = "json"))
  x
}
write_json_raw <- function(obj, file) {
  writeLines(toJSON(full_prec(obj), auto_unbox = TRUE, json_verbatim = TRUE, null = "null",
                    pretty = TRUE, digits = NA), file)
}

for (cs in CASES) {
  if (!is.null(ONLY) && !(cs$id %in% ONLY)) next
  methods <- if (is.null(cs$methods)) c("REML", "ML") else cs$methods
  for (mth in methods) {
    t0 <- now()
    res <- fit_case(cs, mth == "REML")
    res$software_versions <- list(R = R.version.string, lme4 = as.character(packageVersion("lme4")),
                                  lmerTest = as.character(packageVersion("lmerTest")),
                                  pbkrtest = as.character(packageVersion("pbkrtest")),
                                  nlme = as.character(packageVersion("nlme")),
                                  Matrix = as.character(packageVersion("Matrix")),
                                  nloptr = as.character(packageVersion("nloptr")),
                                  jsonlite = as.character(packageVersion("jsonlite")),
                                  BLAS = BLAS, LAPACK = LAPACK)
    out <- file.path(RAW, paste0(res$case_id, ".json"))
    write_json_raw(res, out)
    l <- res$results$lme4
    cat(sprintf("%-22s logLik %.10f singular %-5s polish %d it (grad %.1e -> %.1e) cross-check gain %.1e  %.1fs\n",
                res$case_id, l$logLik, l$singular, l$estimation$polish$iterations,
                l$estimation$polish$max_abs_grad_before, l$estimation$polish$max_abs_grad_after,
                l$estimation$cross_check$max_gain_over_reference, now() - t0))
  }
}
cat(sprintf("done in %.0f s; raw JSON in %s\n", as.numeric(Sys.time() - t_script, units = "secs"), RAW))
