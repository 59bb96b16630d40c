# Reference values for mixedjax.term_tests (tests/test_term_tests.py): lmerTest's per-term F tests
# (anova(fit, type = 1/2/3, ddf = "Satterthwaite"/"Kenward-Roger")) and ranova(fit).
#
# Run from the repository root:
#     Rscript tests/reference/lmertest_anova.R
# Writes tests/reference/lmertest_anova.json.  Generated with R 4.2.2, lme4 1.1-31, lmerTest 3.1-3,
# pbkrtest 0.5.2 (versions recorded in the JSON).  The data are the R packages' own data sets (the
# same values as mixedjax.datasets / tests/data, which are exports of them).
suppressPackageStartupMessages({
  library(lme4)
  library(lmerTest)
  library(jsonlite)
})
data(sleepstudy, cake, Penicillin, package = "lme4")

# pbkrtest::KRmodcomp (called by lmerTest for every term) recomputes Kenward-Roger's adjusted
# covariance each time; for the crossed ScotsSec fit (n = 3435, dense n x n algebra) that is slow, so
# it is computed once per fit.  The values are unchanged.
.vcov_adj <- get("vcovAdj", envir = asNamespace("pbkrtest"))
.vcov_cache <- new.env()
assignInNamespace("vcovAdj", function(object, details = 0) {
  key <- paste(deparse(formula(object)), paste(format(getME(object, "theta"), digits = 17), collapse = ","),
               nobs(object), collapse = " ")
  if (is.null(.vcov_cache[[key]])) .vcov_cache[[key]] <- .vcov_adj(object, details)
  .vcov_cache[[key]]
}, "pbkrtest")
data(Machines, package = "nlme")
data(ScotsSec, package = "mlmRev")

tab_json <- function(tab) {
  tab <- as.data.frame(tab)
  out <- list(rows = I(rownames(tab)))  # I(): length-1 vectors stay JSON arrays
  for (cn in colnames(tab)) out[[cn]] <- I(unname(tab[[cn]]))
  out
}

hyp_json <- function(tab) {
  h <- attr(tab, "hypotheses")
  lapply(h, function(L) list(columns = I(colnames(L)), matrix = lapply(unname(split(L, row(L))), I)))
}

models <- list(
  sleepstudy = list(data = "sleepstudy", formula = "Reaction ~ Days + (Days | Subject)", reml = TRUE,
                    anova = TRUE),
  sleepstudy_ml = list(data = "sleepstudy", formula = "Reaction ~ Days + (Days | Subject)", reml = FALSE,
                       anova = FALSE),
  cake = list(data = "cake", formula = "angle ~ recipe * temp + (1 | recipe:replicate)", reml = TRUE,
              anova = TRUE),
  machines = list(data = "Machines", formula = "score ~ Machine + (1 | Worker) + (1 | Worker:Machine)",
                  reml = TRUE, anova = TRUE),
  penicillin = list(data = "Penicillin", formula = "diameter ~ 1 + (1 | plate) + (1 | sample)", reml = TRUE,
                    anova = FALSE),
  scotssec = list(data = "ScotsSec", formula = "attain ~ verbal * sex + (1 | primary) + (1 | second)",
                  reml = TRUE, anova = TRUE)
)

out <- list(
  meta = list(
    R = R.version.string,
    lme4 = as.character(packageVersion("lme4")),
    lmerTest = as.character(packageVersion("lmerTest")),
    pbkrtest = as.character(packageVersion("pbkrtest")),
    note = paste("anova: lmerTest::anova(fit, type = t, ddf = d); 'hypotheses' are the contrast matrices",
                 "lmerTest tests (attr(, 'hypotheses')), columns named as lme4's fixed effects.",
                 "ranova: lmerTest::ranova(fit) (reduce.terms = TRUE).")
  ),
  models = list()
)

for (name in names(models)) {
  m <- models[[name]]
  t0 <- proc.time()[3]
  d <- get(m$data)
  fit <- lmer(as.formula(m$formula), data = d, REML = m$reml)
  entry <- list(data = m$data, formula = m$formula, reml = m$reml, nobs = nobs(fit),
                singular = isSingular(fit), sigma = sigma(fit), logLik = as.numeric(logLik(fit)),
                fixef = as.list(fixef(fit)), anova = setNames(list(), character(0)),
                hypotheses = setNames(list(), character(0)))
  if (m$anova) {
    for (type in c(1, 2, 3)) {
      for (ddf in c("Satterthwaite", "Kenward-Roger")) {
        key <- paste0("type", type, "_", tolower(ddf))
        tab <- anova(fit, type = type, ddf = ddf)
        entry$anova[[key]] <- tab_json(tab)
        if (ddf == "Satterthwaite") entry$hypotheses[[paste0("type", type)]] <- hyp_json(tab)
      }
    }
  }
  rt <- ranova(fit)
  entry$ranova <- tab_json(rt)
  entry$ranova$formulae <- I(unname(sapply(attr(rt, "formulae"), function(f) paste(deparse(f), collapse = ""))))
  out$models[[name]] <- entry
  cat(sprintf("%s: %.1f s\n", name, proc.time()[3] - t0))
}

writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE, na = "null"),
           "tests/reference/lmertest_anova.json")
cat("wrote tests/reference/lmertest_anova.json\n")
