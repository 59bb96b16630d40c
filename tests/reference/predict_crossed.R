## lme4 / nlme references for mixedjax.predict: predict() on new data (with levels the fit did not see),
## re.form with one term and re.form = NA, and as.data.frame(ranef(fit, condVar = TRUE)) for ALL levels;
## nlme predict(level = 0:1) for the structured-residual fits (Orthodont VarIdent, Oxboys AR(1)).
##
## Usage (from the repository root):  Rscript tests/reference/predict_crossed.R
## writes tests/reference/predict_crossed.json (every double with 17 significant digits).
##
## lme4 numbers are lme4's at the polished REML theta of tests/reference/<case>_reml.json (written by
## make_lme4_refs.R, or copied from ../shared/reference: tight BOBYQA, then a Newton polish), evaluated by
## lmer(..., control = lmerControl(optimizer = NULL), start = list(theta = THETA)); a case without that file
## is fitted with tight BOBYQA tolerances.  The nlme fits use tight lmeControl() tolerances.  The data are the copies
## bundled in mixedjax/datasets (tests/data for subjects_items), with R's level orders from
## mixedjax/datasets/factor_levels.json.

suppressPackageStartupMessages({
  library(lme4)
  library(nlme)
  library(jsonlite)
})

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

read_subjects_items <- function() {
  d <- read.csv("tests/data/subjects_items.csv", colClasses = c("character", "character", "numeric", "numeric"))
  d$subj <- factor(d$subj, levels = sort(unique(d$subj)))
  d$item <- factor(d$item, levels = sort(unique(d$item)))
  d
}

TIGHT <- lmerControl(optimizer = "nloptwrap", calc.derivs = FALSE,
                     optCtrl = list(algorithm = "NLOPT_LN_BOBYQA", xtol_abs = 1e-14, ftol_abs = 1e-15,
                                    xtol_rel = 0, ftol_rel = 0, maxeval = 1e6))

LME4 <- list(
  list(id = "penicillin", data = function() read_shared("Penicillin"),
       formula = "diameter ~ 1 + (1 | plate) + (1 | sample)",
       re_forms = c("~(1 | plate)", "~(1 | sample)"),
       newdata = data.frame(plate = c("a", "m", "a", "y", "y", "zz"),
                            sample = c("A", "F", "G", "A", "G", "F"), stringsAsFactors = FALSE)),
  list(id = "scotssec", data = function() read_shared("ScotsSec"),
       formula = "attain ~ verbal * sex + (1 | primary) + (1 | second)",
       re_forms = c("~(1 | primary)", "~(1 | second)"),
       newdata = data.frame(verbal = c(0, 5, -5, 10, 0, 2.5),
                            sex = factor(c("M", "F", "F", "M", "F", "M"), levels = c("M", "F")),
                            primary = c("1", "2", "1", "P_NEW", "P_NEW", "148"),
                            second = c("9", "1", "S_NEW", "9", "S_NEW", "19"), stringsAsFactors = FALSE)),
  list(id = "subjects_items", data = read_subjects_items,
       formula = "y ~ cond + (1 + cond | subj) + (1 + cond | item)",
       re_forms = c("~(1 + cond | subj)", "~(1 | item)"),
       newdata = data.frame(cond = c(-0.5, 0.5, 0.5, -0.5, 0.5, -0.5),
                            subj = c("S01", "S48", "S01", "S49", "S49", "S10"),
                            item = c("I01", "I32", "I33", "I05", "I33", "I20"), stringsAsFactors = FALSE)),
  list(id = "sleepstudy_corr", data = function() read_shared("sleepstudy"),
       formula = "Reaction ~ Days + (Days | Subject)",
       re_forms = c("~(1 | Subject)", "~(0 + Days | Subject)"),
       newdata = data.frame(Days = c(0, 5, 3, 9.5), Subject = c("308", "309", "NEW", "372"),
                            stringsAsFactors = FALSE)),
  list(id = "sleepstudy_indep", data = function() read_shared("sleepstudy"),
       formula = "Reaction ~ Days + (1 | Subject) + (0 + Days | Subject)",
       re_forms = c("~(0 + Days | Subject)"),
       newdata = data.frame(Days = c(0, 5, 3, 9.5), Subject = c("308", "309", "NEW", "372"),
                            stringsAsFactors = FALSE)),
  list(id = "pastes", data = function() read_shared("Pastes"),
       formula = "strength ~ 1 + (1 | batch/cask)",
       re_forms = c("~(1 | batch)", "~(1 | cask:batch)"),
       newdata = data.frame(batch = c("A", "A", "B", "Z", "J", "J"), cask = c("a", "b", "c", "a", "q", "b"),
                            stringsAsFactors = FALSE))
)

## lme4 at the polished reference theta of tests/reference/<id>_reml.json (tight BOBYQA + Newton polish,
## make_lme4_refs.R / ../shared/reference) where that file exists; else a tight BOBYQA fit
NULLCTRL <- lmerControl(optimizer = NULL, calc.derivs = FALSE)
fit_lme4_at_reference <- function(cs, d) {
  ref <- file.path("tests/reference", paste0(cs$id, "_reml.json"))
  if (file.exists(ref)) {
    th <- unlist(fromJSON(ref, simplifyVector = FALSE)$results$lme4$theta$values)
    fit <- lmer(as.formula(cs$formula), data = d, REML = TRUE, control = NULLCTRL, start = list(theta = th))
    attr(fit, "theta_source") <- paste0("theta of ", ref, " (lme4 evaluated there: optimizer = NULL)")
  } else {
    fit <- lmer(as.formula(cs$formula), data = d, REML = TRUE, control = TIGHT)
    attr(fit, "theta_source") <- "lmer with tight BOBYQA tolerances"
  }
  fit
}

fit_lme4 <- function(cs) {
  d <- cs$data()
  fit <- fit_lme4_at_reference(cs, d)
  nd <- cs$newdata
  cv <- as.data.frame(ranef(fit, condVar = TRUE))
  re <- lapply(cs$re_forms, function(f)
    list(re_form = f, values = I(unname(predict(fit, newdata = nd, re.form = as.formula(f),
                                                 allow.new.levels = TRUE)))))
  list(formula = cs$formula, REML = TRUE, theta_source = attr(fit, "theta_source"),
       logLik = as.numeric(logLik(fit)), theta = I(unname(getME(fit, "theta"))),
       fixed_effects = as.list(fixef(fit)), sigma = sigma(fit),
       newdata = lapply(nd, function(x) I(if (is.factor(x)) as.character(x) else x)),
       predict_all = I(unname(predict(fit, newdata = nd, allow.new.levels = TRUE))),
       predict_re_form = re,
       predict_fixed = I(unname(predict(fit, newdata = nd, re.form = NA))),
       fitted = I(unname(fitted(fit))),
       condvar = list(grpvar = I(as.character(cv$grpvar)), term = I(as.character(cv$term)),
                      grp = I(as.character(cv$grp)), condval = I(cv$condval), condsd = I(cv$condsd)))
}

NLME_CTRL <- lmeControl(maxIter = 500, msMaxIter = 500, msMaxEval = 2000, tolerance = 1e-12, msTol = 1e-14,
                        niterEM = 50, returnObject = TRUE)
NLME <- list(
  list(id = "orthodont_varident", data = function() read_shared("Orthodont"),
       fit = function(d) lme(distance ~ age + Sex, data = d, random = ~ 1 | Subject, method = "REML",
                             weights = varIdent(form = ~ 1 | Sex), control = NLME_CTRL),
       newdata = data.frame(age = c(8, 11, 14, 9.5, 12), Subject = c("M01", "F05", "M16", "F11", "M05"),
                            Sex = c("Male", "Female", "Male", "Female", "Male"), stringsAsFactors = FALSE)),
  list(id = "oxboys_ar1", data = function() read_shared("Oxboys"),
       fit = function(d) lme(height ~ age, data = d, random = ~ 1 | Subject, method = "REML",
                             correlation = corAR1(form = ~ 1 | Subject), control = NLME_CTRL),
       newdata = data.frame(age = c(-1, 0, 0.5, 1), Subject = c("1", "2", "26", "10"), stringsAsFactors = FALSE))
)

fit_nlme <- function(cs) {
  d <- cs$data()
  fit <- cs$fit(d)
  nd <- cs$newdata
  for (col in names(nd)) if (is.factor(d[[col]])) nd[[col]] <- factor(nd[[col]], levels = levels(d[[col]]),
                                                                          ordered = is.ordered(d[[col]]))
  p <- predict(fit, newdata = nd, level = 0:1)
  list(call = paste(deparse(fit$call), collapse = " "), logLik = as.numeric(logLik(fit)),
       fixed_effects = as.list(fixef(fit)),
       newdata = lapply(cs$newdata, function(x) I(x)),
       predict_level0 = I(unname(p$predict.fixed)), predict_level1 = I(unname(p$predict.Subject)),
       fitted_level1 = I(unname(fitted(fit, level = 1))))
}

out <- list(
  software = list(R = R.version.string, lme4 = as.character(packageVersion("lme4")),
                  nlme = as.character(packageVersion("nlme"))),
  note = paste("lme4: predict(fit, newdata = ND, allow.new.levels = TRUE) (predict_all),",
               "predict(..., re.form = F, allow.new.levels = TRUE) (predict_re_form), predict(..., re.form = NA)",
               "(predict_fixed), as.data.frame(ranef(fit, condVar = TRUE)) for every level (condvar), REML, lme4",
               "evaluated at the polished reference theta (theta_source). nlme: predict(fit, newdata = ND, level = 0:1), tight lmeControl()."),
  lme4 = setNames(lapply(LME4, fit_lme4), vapply(LME4, `[[`, "", "id")),
  nlme = setNames(lapply(NLME, fit_nlme), vapply(NLME, `[[`, "", "id")))
writeLines(toJSON(out, auto_unbox = TRUE, digits = I(17), pretty = TRUE, null = "null", na = "null"),
           "tests/reference/predict_crossed.json")
cat("wrote tests/reference/predict_crossed.json\n")
